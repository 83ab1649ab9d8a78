"""The LLM calibration contract: what an LLM calibration (MBQ/AWQ, PM-KVQ, MoA, R2R labels, GPTQ, ...)
gets from a framework, with plain torch tensors and modules.

A method asks for an :class:`LLMCalibration` through :func:`load_for_calibration` (the transformers
implementation lives in ``overdrive.adapters.transformers.calibration``; methods never import it) and
then works **block by block**, so a model larger than the device still calibrates:

* weights stay on the CPU (memory-mapped where the checkpoint allows); one decoder block at a time is
  moved to the device (``block.module``), calibrated, written back to the CPU and released
  ("sequential onloading"); peak device memory is about one block plus the calibration activations
  (which live on the device unless ``offload_activations``);
* :meth:`LLMCalibration.blocks` yields every decoder block with its captured inputs (one call per
  calibration batch); what a block outputs becomes the next block's inputs, either after the method
  changed the block (``propagate="calibrated"``: e.g. AWQ folds scales; GPTQ quantizes the weights)
  or from the block as it was before (``propagate="original"``), or whatever the method hands
  :meth:`CalibrationBlock.set_outputs` (e.g. outputs of a fake-quantized copy);
* :meth:`CalibrationBlock.record` captures the inputs and outputs of a block's sub-modules named by
  role (``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"gate"``, ``"up"``, ``"down"``, ``"attn_norm"``,
  ``"mlp_norm"``, ``"attn"``, ``"mlp"``), e.g. to accumulate per-linear statistics or Hessians
  (sum of x xᵀ) while the block is on the device;
* an :data:`AttentionFn` sees every attention call of a block (q, k, v after RoPE, per layer) and may
  replace its output (MoA's spans) or just record (PM-KVQ's key statistics);
* :meth:`LLMCalibration.backward` gives gradient-based profiles (PM-KVQ sensitivity, MoA influence,
  MBQ's gradient ratios) without the whole model on the device: the forward keeps each block's inputs,
  the loss is taken on the head, then in reverse order block i is onloaded and recomputed with inputs
  that require grad, the incoming gradient is back-propagated through it (the method sees that
  block's attention calls and retained sub-module outputs with their gradients) and the gradient of
  its input is passed to block i - 1.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch

from overdrive.config import ConfigError

from .kv_cache import ModelIdentity

#: how a block's outputs reach the next block (see :meth:`LLMCalibration.blocks`)
PROPAGATE = ("calibrated", "original")

#: the implementations of this contract, by framework: "module:attribute" of their ``load``
BACKENDS = {"transformers": "overdrive.adapters.transformers.calibration:load"}
#: framework-neutral views of a decoder block's sparse MoE block (router decision, expert weights), by
#: framework: "module:attribute" of ``moe_view(block_module, config) -> view | None`` (None: dense block)
MOE_VIEWS = {"transformers": "overdrive.adapters.transformers.moe_quant:moe_view"}
#: their tokenizer loaders
TOKENIZERS = {"transformers": "overdrive.adapters.transformers.calibration:load_tokenizer"}

#: a calibration batch: the model's keyword inputs (``input_ids``, ``attention_mask``, ``position_ids``,
#: ``pixel_values``, ...), tensors on the CPU
Batch = Mapping[str, torch.Tensor]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """The device a calibration runs on: ``None`` -> CUDA when available, else CPU. A CUDA device on a
    machine without CUDA is a :class:`ConfigError` (one line, exit status 2, before anything is read)."""
    if device is None or device == "":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {device!r}: not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                          "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"auto"``/None: the checkpoint's own dtype; else float32, bfloat16 or float16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def add_device_arguments(p: Any, dtype_default: str = "auto", activations: bool = True) -> None:
    """``--device``, ``--dtype`` and ``--offload-activations``: shared by every LLM calibration command."""
    p.add_argument("--device", default=None,
                   help="device the decoder blocks are calibrated on, one block at a time (default: cuda when "
                        "available, else cpu)")
    p.add_argument("--dtype", default=dtype_default, choices=tuple(DTYPES),
                   help=f"dtype the model is loaded and run in (auto: the checkpoint's; default {dtype_default})")
    if not activations:
        return
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations on the CPU (moved to the device per batch) instead of "
                        "on the device")


@dataclasses.dataclass(frozen=True)
class LLMGeometry:
    """Model identity and shapes of the language decoder."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    max_position_embeddings: int
    is_vlm: bool = False
    vision_token_ids: tuple[int, ...] = ()
    #: the MLP's hidden width (gate/up outputs, down inputs); 0 when the model does not say
    intermediate_size: int = 0

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.architecture, self.num_layers, self.num_attention_heads, self.num_kv_heads,
                             self.head_size)


@dataclasses.dataclass
class AttentionCall:
    """One attention call of decoder layer ``layer``: q ``(B, Hq, N, D)``, k/v ``(B, Hk, N, D)`` after RoPE.

    ``default()`` computes the model's own causal attention (SDPA with the model's mask) and returns
    ``(B, N, Hq, D)``, the layout an :data:`AttentionFn` returns too.
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    default: Callable[[], torch.Tensor]


#: sees every attention call of the blocks it runs for; returns the attention output ``(B, N, Hq, D)``
#: or None (the model's own attention is used)
AttentionFn = Callable[[AttentionCall], "torch.Tensor | None"]


@dataclasses.dataclass
class BlockCall:
    """One call of a decoder block: hidden states ``(B, N, H)`` and the other arguments (masks, rotary
    embeddings, ...), already on the block's device."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0] * self.hidden.shape[1])


@dataclasses.dataclass
class Recording:
    """What one sub-module saw over a block's calls: its first input and its first output per call
    (each ``(B, N, F)``), and (``keep_calls``) its full positional/keyword arguments to replay it."""

    inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    outputs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    calls: list[tuple[tuple, dict]] = dataclasses.field(default_factory=list)

    def input_rows(self) -> torch.Tensor:
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs])

    def output_rows(self) -> torch.Tensor:
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.outputs])


class CalibrationBlock(Protocol):
    """One decoder block, on the device while the method holds it."""

    index: int
    module: torch.nn.Module
    #: role -> sub-module: "attn_norm", "q", "k", "v", "o", "attn", "mlp_norm", "gate", "up", "down", "mlp"
    roles: Mapping[str, torch.nn.Module]
    device: torch.device

    def calls(self) -> list[BlockCall]:
        """The block's inputs, one call per calibration batch (on the device)."""

    def run(self, calls: Sequence[BlockCall] | None = None, attention: AttentionFn | None = None
            ) -> list[torch.Tensor]:
        """The block's outputs ``(B, N, H)`` on ``calls`` (default: all), no grad."""

    def record(self, roles: Sequence[str], calls: Sequence[BlockCall] | None = None, keep_calls: bool = False,
               on_input: Callable[[str, torch.Tensor, int], None] | None = None,
               keep: Callable[[int], bool] | None = None, outputs: list[torch.Tensor] | None = None
               ) -> dict[str, Recording]:
        """Run the block on ``calls`` and record the named sub-modules. ``on_input(role, x, call_index)``
        sees every input ``(B, N, F)`` (e.g. to accumulate statistics, or per-linear Hessians sum x xᵀ,
        token-weighted by the call's sample, without keeping the inputs); ``keep(call_index)``
        chooses the calls whose tensors are kept (default: all); ``outputs`` (a list) receives the
        block's outputs, e.g. to propagate them with :meth:`set_outputs` without running the block again."""

    def set_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        """Propagate these outputs (one per call) to the next block instead of running the block."""


@dataclasses.dataclass(frozen=True)
class ModelEnds:
    """The modules around the decoder blocks, on the CPU in the storage dtype: the token embedding
    (``weight`` (V, H)), the final norm before the head, and the LM head (``weight`` (V, H)). Methods
    that transform the residual stream (e.g. a rotation) change them in place."""

    embedding: torch.nn.Module
    final_norm: torch.nn.Module
    head: torch.nn.Module


LossFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``loss(logits, batch_index)`` -> a scalar; ``logits`` are the head's outputs at the requested positions."""


class LLMCalibration(Protocol):
    """A language model loaded for calibration (:func:`load_for_calibration`)."""

    geometry: LLMGeometry
    device: torch.device
    dtype: torch.dtype
    #: the tokenizer (and, for VLMs, the processor: ``processor``; else the tokenizer again)
    tokenizer: Any
    processor: Any
    config: Any

    def blocks(self, batches: Sequence[Batch], propagate: str = "calibrated",
               desc: str = "calibration") -> Iterator[CalibrationBlock]:
        """Every decoder block in order with its inputs on ``batches`` (progress bar per block)."""

    def forward(self, batches: Sequence[Batch], attention: AttentionFn | None = None,
                logits: slice | None = None, desc: str | None = None) -> list[torch.Tensor]:
        """Block-by-block forward, no grad: the head's logits per batch (positions ``logits``, default all)."""

    def backward(self, batches: Sequence[Batch], loss: LossFn, *, attention: AttentionFn | None = None,
                 retain: Sequence[str] = (), logits: slice | None = None,
                 visit: Callable[[CalibrationBlock, int, dict[str, tuple[torch.Tensor, torch.Tensor]]], None]
                 | None = None, desc: str | None = None) -> list[float]:
        """Block-wise backward of ``loss`` per batch; returns the losses. In reverse block order, each
        block is recomputed on its kept inputs with grad (``attention`` sees its calls, whose tensors can
        retain grad) and ``visit(block, batch_index, {role: (output, grad)})`` runs after its backward
        (``retain``: roles whose outputs and gradients are handed over)."""

    def input_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``ids`` (CPU)."""

    def ends(self, untie: bool = False) -> ModelEnds:
        """The embedding, final norm and LM head. ``untie``: when the head shares the embedding's weight,
        give it its own copy first (and record that in the config), so the two can change apart and the
        saved checkpoint holds both."""

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ``ids`` (B, N) by ``new_tokens`` tokens: (B, N + new_tokens), CPU."""

    def save(self, path: str | Path) -> None:
        """Write the (calibrated) model and its tokenizer/processor as a checkpoint folder."""

    def resident_model(self) -> torch.nn.Module:
        """The whole model on the device, for calibrations that generate with a KV cache (R2R labels); it
        must fit the device. Called as the framework calls it (``model(input_ids=..., ...)``)."""

    def close(self) -> None:
        """Restore the model (attention implementation) and release the device."""


def load_for_calibration(model: str | Path | torch.nn.Module, *, device: str | None = None, dtype: str | torch.dtype | None = None,
                         offload_activations: bool = False, framework: str = "transformers",
                         compute_dtype: torch.dtype | None = None, **kw: Any) -> LLMCalibration:
    """Load a checkpoint folder (or wrap a model object of the framework) for calibration with the framework's implementation of this contract.

    ``device``: where blocks run (None: CUDA when available, else CPU). ``dtype``: what the weights are
    loaded as (None/"auto": the checkpoint's). ``compute_dtype``: what the onloaded block and the
    activations use (default: ``dtype``).
    """
    from overdrive.spec import _resolve

    if framework not in BACKENDS:
        raise ConfigError(f"no LLM calibration for framework {framework!r}; known: {', '.join(BACKENDS)}")
    device = check_device(device)
    if not isinstance(model, torch.nn.Module):
        model = Path(model)
    return _resolve(BACKENDS[framework])(model, device=device, dtype=check_dtype(dtype),
                                         offload_activations=offload_activations, compute_dtype=compute_dtype, **kw)


def load_tokenizer(model: str | Path, framework: str = "transformers") -> Any:
    """The tokenizer of a checkpoint folder, without loading its weights."""
    from overdrive.spec import _resolve

    if framework not in TOKENIZERS:
        raise ConfigError(f"no LLM calibration for framework {framework!r}; known: {', '.join(TOKENIZERS)}")
    return _resolve(TOKENIZERS[framework])(Path(model))


def moe_view(module: torch.nn.Module, config: Any = None, framework: str = "transformers") -> Any:
    """The sparse MoE block of a calibration block's module as a view, or None for a dense block.

    A view has ``num_experts``, ``top_k``, ``hidden``, ``intermediate``, ``shared_expert``,
    ``act_fn``, ``route(x (T, H)) -> (weights (T, k), ids (T, k))`` (the model's own router) and
    ``weight(expert, "gate"|"up"|"down") -> (N, K)`` (on the block's device)."""
    from overdrive.spec import _resolve

    if framework not in MOE_VIEWS:
        raise ConfigError(f"no MoE view for framework {framework!r}; known: {', '.join(MOE_VIEWS)}")
    return _resolve(MOE_VIEWS[framework])(module, config)

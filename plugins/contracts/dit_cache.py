"""The DiT caching / attention-compression contract (kind ``dit_caching``).

A DiT method is a set of framework-neutral callbacks (:class:`DiTHooks`) that the diffusers hook
layer (``overdrive.adapters.diffusers.hooks``) calls around the denoiser, its transformer blocks, its
attention modules and the attention op inside them. The layer owns everything that depends on the
framework:

* finding the denoiser and its blocks from per-model metadata (:class:`DenoiserInfo`);
* one rule for the denoising step and the CFG branch of every denoiser call (:class:`StepContext`):
  the same for cond/uncond pipelines, batched-CFG pipelines and direct denoiser calls;
* running a module's own forward (:class:`ModuleCall`) and, inside an attention module, handing the
  method its attention op (:class:`AttentionOp`) while the module's processor does everything else;
* per-block temporal positions for video denoisers (:meth:`DenoiserSession.run_at_frames`: a block
  computed with its rotary embedding at given latent frame positions), from :class:`RotaryInfo`;
* several methods on one denoiser (each :meth:`overdrive.diffusers.enable` adds one; the first enabled
  is the outermost at every level) and :meth:`DenoiserSession.invalidate` when one of them changes
  the latent's shape mid-run;
* exact restore: ``detach()`` leaves parameters, hooks, processors and outputs as they were;
* recording and replaying denoiser calls for calibration (:class:`CalibrationRun`).

A method therefore imports no diffusers and no adapter: it gets torch tensors, a step context and
callables. State lives in the method's :class:`DiTHooks` instance, never on classes.

Writing one: subclass :class:`DiTHooks`, override the callbacks you need (the layer hooks only the
levels whose callbacks are overridden), and return it from :meth:`DiTCacheMethod.hooks`.
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

import torch

from ..config import MethodConfig


@dataclasses.dataclass(frozen=True)
class RotaryInfo:
    """Where a video denoiser's rotary position embedding comes from and goes to.

    module       attribute of the denoiser that computes the embedding from the latent input
                 (called with a tensor of the latent's layout; only its shape and device are read)
    block_arg    positional index of the embedding in every block's call
    block_names  its keyword name(s) in the block signatures (blocks of different lists may differ)
    token_dim    the token axis of each tensor the module returns (tokens frame-major: frame, row, column)
    """

    module: str
    block_arg: int
    block_names: tuple[str, ...]
    token_dim: int


@dataclasses.dataclass(frozen=True)
class DenoiserInfo:
    """What a DiT method needs to know about a denoiser, independent of the framework.

    family       model family key (``"flux"``, ``"sd3"``, ``"pixart"``, ``"wan"``, ...)
    block_lists  attribute names of the ``nn.ModuleList``s of transformer blocks, in call order
    attention    attribute name of the self-attention module inside a block
    joint_text   whether text tokens go through the same attention as image tokens (MMDiT)
    text_first   with joint_text: text tokens precede the vision tokens in the joint sequence (Flux,
                 CogVideoX) rather than follow them (SD3, HunyuanVideo)
    frame_dim    video denoisers: the frame axis of the latent input (2 for (B, C, F, H, W)); None for images
    rotary       video denoisers with rotary positions computed once per call: :class:`RotaryInfo`
    """

    family: str
    block_lists: tuple[str, ...]
    attention: str = "attn"
    joint_text: bool = False
    text_first: bool = True
    frame_dim: int | None = None
    rotary: RotaryInfo | None = None

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        out: list[torch.nn.Module] = []
        for name in self.block_lists:
            out.extend(getattr(denoiser, name))
        return out

    def text_span(self, seq_len: int, text_tokens: int | None) -> tuple[int, int]:
        """``[start, stop)`` of the text tokens in a joint attention sequence of ``seq_len`` tokens."""
        if not self.joint_text or not text_tokens:
            return 0, 0
        return (0, text_tokens) if self.text_first else (seq_len - text_tokens, seq_len)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Where the denoising loop is, for one denoiser call (the same object for every module inside it).

    branch       the CFG branch: the pipeline's cache-context name (``"cond"``, ``"uncond"``,
                 ``"cond_uncond"``), ``"default"`` when the pipeline names none (SD3, PixArt)
    step         0-based denoising step of this branch's current run
    new_run      the first call of a run of this branch (caches of an earlier run must not be reused)
    timestep     the timestep the denoiser was called with (its first element), None if it got none;
                 pipelines differ: FluxPipeline passes the scheduler's timestep / 1000, SD3, PixArt
                 and Wan pass it as is (use ``step`` / ``num_steps`` for a scale-free position)
    num_steps    the run's step count when known (the pipeline's context or its scheduler), else None
    batch        batch size of the call's latents
    cfg_batched  both CFG halves are in this call's batch (identical latent halves, and the
                 pipeline's ``do_classifier_free_guidance`` not False where it has that property:
                 the unconditional half first, as diffusers' pipelines concatenate them)
    text_tokens  joint-attention models: text tokens in the attention sequence (None if the call
                 carried no text); 0 for models whose text goes through cross-attention
    """

    branch: str
    step: int
    new_run: bool
    timestep: float | None = None
    num_steps: int | None = None
    batch: int = 0
    cfg_batched: bool = False
    text_tokens: int | None = 0


class ModuleCall:
    """One call of a hooked module: its arguments and a way to run its own forward.

    ``run()`` runs the module's forward (the rest of the hook chain) on the original arguments;
    ``run_with(*args, **kwargs)`` on rewritten ones (e.g. per-block positions). Not calling either
    reuses whatever the callback returns instead (module-output reuse).
    """

    __slots__ = ("args", "kwargs", "_forward")

    def __init__(self, args: tuple, kwargs: dict, forward: Callable[..., Any]) -> None:
        self.args, self.kwargs, self._forward = args, kwargs, forward

    def run(self) -> Any:
        return self._forward(*self.args, **self.kwargs)

    def run_with(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


@dataclasses.dataclass
class AttentionOp:
    """The attention op an attention module asked for (``scaled_dot_product_attention`` semantics).

    query/key/value  (B, H, S, D)
    text             ``[start, stop)`` of the text tokens in S (joint attention), (0, 0) otherwise
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    text: tuple[int, int] = (0, 0)
    # with several methods on one denoiser: the next (inner) method's attention for this op
    inner: Callable[["AttentionOp"], torch.Tensor] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def plain(self) -> bool:
        """No mask, causality, dropout or GQA: plain softmax attention over all S keys."""
        return self.attn_mask is None and not self.is_causal and not self.dropout_p and not self.enable_gqa

    def compute(self) -> torch.Tensor:
        """The op exactly as the module asked for it (through the inner methods' ``attention`` when
        several methods are enabled)."""
        if self.inner is not None:
            return self.inner(self)
        return torch.nn.functional.scaled_dot_product_attention(
            self.query, self.key, self.value, attn_mask=self.attn_mask, dropout_p=self.dropout_p,
            is_causal=self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa)


class DenoiserSession(Protocol):
    """The hook layer's handle on one denoiser, given to a method's :class:`DiTHooks`."""

    method: str                                 # the method's name (for messages)
    module: torch.nn.Module                     # the denoiser (torch module)
    architecture: str                           # its class name
    info: DenoiserInfo
    blocks: list[torch.nn.Module]               # in DenoiserInfo block order
    attention_modules: list[torch.nn.Module]    # one per block, same order
    heads: int                                  # of the attention modules
    head_dim: int

    @property
    def current(self) -> StepContext | None:
        """The step context of the denoiser call in progress (None between calls): any code running
        inside the denoiser — a hooked module, a quantized linear — reads the step from here."""

    def reset(self) -> None:
        """End every run now: the next denoiser call of each branch starts a new run."""

    def invalidate(self) -> None:
        """The latent changed shape mid-run (a frame-rate method shortened it): every method drops its
        caches (``reset_caches``) while the runs and step counts go on."""

    def run_at_frames(self, call: ModuleCall, positions: Sequence[int]) -> Any:
        """Run a block call (``block_call``) of a video denoiser with its tokens' temporal positions
        set to ``positions`` (one original latent frame index per frame of the current latent) instead
        of 0..T'-1: its rotary embedding is recomputed for those positions (per-block RoPE)."""

    def remove(self, hooks: "DiTHooks") -> None:
        """Remove one method's hooks; removing the last one detaches everything (exact restore)."""

    def detach(self) -> None:
        """Remove every method's hooks; the model is exactly as before (idempotent)."""


class DiTHooks:
    """A DiT method's callbacks. Override what you need; the defaults run the model unchanged.

    The layer hooks a level only when its callback is overridden (``block_call`` → every block,
    ``attention_call`` or ``attention`` → every attention module), so unused levels cost nothing.
    An instance serves one denoiser; its attributes are the method's state.
    """

    def __init__(self, session: DenoiserSession) -> None:
        self.session = session

    # -- callbacks (called by the layer) ------------------------------------------------------------
    def denoiser_call(self, step: StepContext, call: ModuleCall) -> Any:
        """One denoiser call; return its output (``call.run()``, or a reused one)."""
        return call.run()

    def block_call(self, step: StepContext, block: int, call: ModuleCall) -> Any:
        """Transformer block ``block`` (DenoiserInfo order); rewrite arguments with ``call.run_with``."""
        return call.run()

    def attention_call(self, step: StepContext, block: int, call: ModuleCall) -> Any:
        """Attention module of block ``block``. ``call.run()`` runs the module's own processor, with its
        attention op routed to :meth:`attention` when that is overridden."""
        return call.run()

    def attention(self, step: StepContext, block: int, op: AttentionOp) -> torch.Tensor:
        """The attention op inside attention module ``block``: return its (B, H, S, D) output."""
        return op.compute()

    def reset_caches(self) -> None:
        """Every run ended (end of a pipeline call, or :meth:`reset`): drop per-run state."""

    def detached(self) -> None:
        """The layer removed its hooks (``detach()``): undo whatever the method changed on the model
        itself (e.g. put back modules it replaced), so the model is exactly as before."""

    # -- for users -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every run and cache: the next denoiser call starts a new run."""
        self.session.reset()

    def detach(self) -> None:
        """Remove the method from the denoiser (other methods enabled on it stay); with no method
        left the model is exactly as before."""
        self.session.remove(self)


H = TypeVar("H", bound=DiTHooks)


class Attachment(Protocol):
    def detach(self) -> None:
        """Remove every hook/processor the method attached; afterwards the model is as before."""


@dataclasses.dataclass
class RecordedCall:
    """One denoiser call recorded during an unaccelerated pipeline run (inputs cloned)."""

    step: StepContext
    args: tuple
    kwargs: dict
    output: torch.Tensor          # the denoiser's prediction tensor
    replay_context: Any = None    # what the layer needs to replay the call in the same context


class CalibrationRun(Protocol):
    """What a method's ``calibrate`` gets: one pipeline call to record, and a denoiser to replay it on."""

    method: str
    architecture: str
    info: DenoiserInfo

    def record(self) -> list[list[RecordedCall]]:
        """Run the pipeline call once without the method; its denoiser calls grouped by step
        (the calls of one step: one per CFG branch, in call order)."""

    def attach(self, make_hooks: Callable[[DenoiserSession], H]) -> H:
        """Attach hooks built by ``make_hooks(session)`` for replays; ``hooks.detach()`` removes them."""

    def replay(self, calls: Sequence[RecordedCall]) -> list[torch.Tensor]:
        """Run the denoiser on recorded calls, each in its recorded step context (not re-inferred),
        through the attached hooks; returns the prediction tensors."""

    def denoiser_writer(self) -> "DenoiserWriter":
        """A writer of the denoiser as a framework model directory with some modules replaced
        (for methods whose artifact is a quantized checkpoint); usable after calibration returns."""


class DenoiserWriter(Protocol):
    def __call__(self, path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                 quantization_config: dict[str, Any], replaced: Sequence[str]) -> Path:
        """Write (atomically) the denoiser's config with ``quantization_config`` added and its weights,
        where the tensors of the modules named in ``replaced`` are dropped and ``tensors`` added."""


class CalibrationArtifact(Protocol):
    """What ``calibrate`` returns: something that saves itself (atomically) and describes itself.

    An artifact with ``denoiser_checkpoint = True`` saves a denoiser model directory (quantized
    weights); ``overdrive calibrate`` then writes a whole pipeline directory around it (the input
    pipeline's other components, linked or copied) that ``DiffusionPipeline.from_pretrained`` loads.
    """

    def save(self, path: str | os.PathLike[str]) -> Path: ...

    def summary(self) -> str: ...


class DiTCacheMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach the diffusers adapter.

    Methods whose artifact is a quantized denoiser checkpoint set ``checkpoint_format = True`` and
    implement :meth:`prepare_checkpoint` / :meth:`finish_checkpoint`: the diffusers adapter then
    registers a quantizer under the method's name, so ``from_pretrained`` loads a checkpoint whose
    config says ``quantization_config.quant_method == name`` and attaches the method's hooks.
    """

    checkpoint_format: bool = False

    @abc.abstractmethod
    def hooks(self, session: DenoiserSession, cfg: MethodConfig) -> DiTHooks:
        """Build the method's callbacks for one denoiser (``overdrive.diffusers.enable``)."""

    def calibrate(self, run: CalibrationRun, **options: Any) -> CalibrationArtifact:
        """Offline calibration on one recorded pipeline call (``overdrive.diffusers.calibrate``)."""
        raise NotImplementedError(f"{type(self).__name__} has no calibration")

    def calibration_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """Map the method's own ``overdrive calibrate`` options to :meth:`calibrate` keywords."""
        return {}

    def prepare_checkpoint(self, model: torch.nn.Module, info: DenoiserInfo,
                           quantization_config: dict[str, Any]) -> tuple[MethodConfig, list[str]]:
        """Before a checkpoint's weights load (the model's parameters are on the meta device): put the
        method's modules in place of those the checkpoint replaced. Returns the config :meth:`hooks`
        gets once loading finished and the names of the replaced modules (their tensors load as
        stored: dtypes kept)."""
        raise NotImplementedError(f"{type(self).__name__} has no checkpoint format")

    def finish_checkpoint(self, model: torch.nn.Module, cfg: MethodConfig) -> None:
        """After the weights loaded: check that every replaced module got its tensors (ConfigError)."""


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``overdrive calibrate --method NAME`` shared by every DiT method: the pipeline,
    its inputs and the output file. A method's ``add_arguments`` calls this, then adds its own; its
    ``MethodCommand.run`` is ``"overdrive.diffusers:calibrate_command"``."""
    p.add_argument("--pipeline", required=True, type=Path,
                   help="diffusers pipeline directory (DiffusionPipeline.from_pretrained)")
    p.add_argument("--output", required=True, type=Path, help="file to write (atomically)")
    p.add_argument("--steps", type=int, required=True, help="num_inference_steps the calibration is for")
    p.add_argument("--prompt", action="append", default=None,
                   help="calibration prompt (repeat for several; needs the pipeline's text encoders)")
    p.add_argument("--embeds", type=Path, default=None,
                   help="safetensors file of pipeline inputs instead of prompts (prompt_embeds, "
                        "negative_prompt_embeds, pooled_prompt_embeds, ...; batch = calibration prompts)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="video pipelines")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")

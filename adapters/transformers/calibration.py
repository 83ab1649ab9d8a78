""":class:`~overdrive.contracts.llm_calibration.LLMCalibration` for transformers causal LMs and VLMs.

Loading: ``from_pretrained`` onto the CPU (the checkpoint's dtype, or ``--dtype``). Only the decoder
blocks are onloaded one at a time (``Onloader``); the modules before the first block (embeddings,
vision tower, rotary embeddings) are on the device while the first block's inputs are captured, and
the final norm and LM head while a loss or logits are taken. A block runs in ``compute_dtype`` and is
cast back to the storage dtype when released. Attention goes through one function registered with
transformers' ``AttentionInterface`` (masks as for SDPA), which hands each call to the method's
:data:`~overdrive.contracts.llm_calibration.AttentionFn` when one is active.

Per-model knowledge is the role table (:data:`ROLES`): Llama/Qwen2/Mistral-style decoder blocks.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import (PROPAGATE, AttentionCall, AttentionFn, Batch, BlockCall,
                                                 LLMGeometry, LossFn, ModelEnds, Recording)
from overdrive.progress import progress

ATTENTION = "overdrive_calibration"

#: role -> attribute path inside a decoder block (Llama, Qwen2, Qwen2-VL's language model, Mistral, ...)
ROLES = {"attn_norm": "input_layernorm", "attn": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
         "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm", "mlp": "mlp",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

_ATTN: contextvars.ContextVar[AttentionFn | None] = contextvars.ContextVar("overdrive_calibration_attention",
                                                                          default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: SDPA, or the active method's :data:`AttentionFn`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fn = _ATTN.get()
    if fn is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)

    def default() -> torch.Tensor:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scale,
                                      **kwargs)[0]

    out = fn(AttentionCall(int(module.layer_idx), query, key, value, scale, default))
    return (default() if out is None else out), None


@contextlib.contextmanager
def using(fn: AttentionFn | None) -> Iterator[None]:
    """Hand the attention calls run inside to ``fn`` (None: the model's own attention)."""
    token = _ATTN.set(fn)
    try:
        yield
    finally:
        _ATTN.reset(token)


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(the language decoder, its layer list): the ``layers`` list whose blocks have self_attn and mlp."""
    for name, mod in model.named_modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn") \
                and hasattr(layers[0], "mlp") and "visual" not in name:
            return mod, layers
    raise ConfigError(f"{type(model).__name__}: no decoder layer list with self_attn and mlp found; LLM calibration "
                      "supports Llama/Qwen2-style decoders")


def block_roles(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {}
    for role, path in ROLES.items():
        mod = layer
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if mod is not None:
            out[role] = mod
    return out


def geometry(config: Any) -> LLMGeometry:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    vis = tuple(int(getattr(config, k)) for k in ("image_token_id", "video_token_id")
                if getattr(config, k, None) is not None)
    return LLMGeometry(str(arch), int(text.num_hidden_layers), int(text.hidden_size), heads, kv,
                       int(getattr(text, "head_dim", None) or int(text.hidden_size) // heads), int(text.vocab_size),
                       int(getattr(text, "max_position_embeddings", 0) or 0), hasattr(config, "vision_config"), vis,
                       int(getattr(text, "intermediate_size", 0) or 0))


def _nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Onloader:
    """Moves decoder blocks between the CPU (storage dtype) and the device (compute dtype), one at a time;
    counts the bytes of block parameters on the device (``resident``, ``peak``) so tests can check it."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype) -> None:
        self.device, self.compute_dtype = device, compute_dtype
        self.onloaded: dict[int, torch.dtype] = {}
        self.resident = self.peak = 0
        self.max_blocks = 0

    def onload(self, index: int, layer: torch.nn.Module) -> None:
        if index in self.onloaded:
            return
        self.onloaded[index] = next(layer.parameters()).dtype
        layer.to(self.device, self.compute_dtype)
        self.resident += _nbytes(layer)
        self.peak = max(self.peak, self.resident)
        self.max_blocks = max(self.max_blocks, len(self.onloaded))

    def offload(self, index: int, layer: torch.nn.Module) -> None:
        if index not in self.onloaded:
            return
        self.resident -= _nbytes(layer)
        layer.to("cpu", self.onloaded.pop(index))


def _cast(v: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)
    if isinstance(v, tuple):
        return tuple(_cast(t, device, dtype) for t in v)
    return v


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class Block:
    """:class:`~overdrive.contracts.llm_calibration.CalibrationBlock` of :class:`TransformersCalibration`."""

    def __init__(self, run: "TransformersCalibration", index: int, calls: list[BlockCall]) -> None:
        self._run, self.index, self._calls = run, index, calls
        self.module = run.layers[index]
        self.roles = block_roles(self.module)
        self.device = run.device
        self._outputs: list[torch.Tensor] | None = None

    def calls(self) -> list[BlockCall]:
        return [self._run._on_device(c) for c in self._calls]

    def _forward(self, c: BlockCall) -> torch.Tensor:
        return _first(self.module(c.hidden, **c.kwargs))

    @torch.no_grad()
    def run(self, calls: Sequence[BlockCall] | None = None, attention: AttentionFn | None = None
            ) -> list[torch.Tensor]:
        with using(attention):
            return [self._forward(self._run._on_device(c)) for c in (self._calls if calls is None else calls)]

    @torch.no_grad()
    def record(self, roles: Sequence[str], calls: Sequence[BlockCall] | None = None, keep_calls: bool = False,
               on_input: Callable[[str, torch.Tensor, int], None] | None = None,
               keep: Callable[[int], bool] | None = None, outputs: list[torch.Tensor] | None = None
               ) -> dict[str, Recording]:
        recs = {r: Recording() for r in roles}
        state = {"keep": True, "call": 0}
        handles = []
        for r in roles:
            if r not in self.roles:
                raise ConfigError(f"decoder block {self.index} has no {r!r} module")

            def pre(_m, args, kwargs, r=r):
                x = args[0] if args else kwargs["hidden_states"]
                if on_input is not None:
                    on_input(r, x, state["call"])
                if state["keep"]:
                    recs[r].inputs.append(x.detach())
                    if keep_calls:
                        recs[r].calls.append((args, dict(kwargs)))

            def post(_m, _args, _kwargs, out, r=r):
                if state["keep"]:
                    recs[r].outputs.append(_first(out).detach())

            handles += [self.roles[r].register_forward_pre_hook(pre, with_kwargs=True),
                        self.roles[r].register_forward_hook(post, with_kwargs=True)]
        try:
            for j, c in enumerate(self._calls if calls is None else calls):
                state["keep"], state["call"] = keep is None or keep(j), j
                out = self._forward(self._run._on_device(c))
                if not torch.isfinite(out).all():
                    raise ConfigError(f"NaN/inf activations at decoder layer {self.index} (block output) on "
                                      f"calibration batch {j}; nothing was written")
                if outputs is not None:
                    outputs.append(self._run._store(out))
        finally:
            for h in handles:
                h.remove()
        return recs

    def set_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        if len(outputs) != len(self._calls):
            raise ValueError(f"set_outputs: {len(outputs)} outputs for {len(self._calls)} calls")
        self._outputs = list(outputs)


class TransformersCalibration:
    """A transformers model loaded for block-by-block calibration (see the contract)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype | None = None, offload_activations: bool = False,
                 tokenizer: Any = None, processor: Any = None, source: Path | None = None) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        self.model = model.eval()
        self.config = model.config
        self.decoder, self.layers = decoder_layers(model)
        self.geometry = geometry(model.config)
        self.device = torch.device(device)
        self.storage_dtype = next(model.parameters()).dtype
        self.dtype = compute_dtype or self.storage_dtype
        self.offload_activations = offload_activations
        self.onloader = Onloader(self.device, self.dtype)
        self._tokenizer, self._processor, self.source = tokenizer, processor, source
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        self._prev_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION)
        self._closed = False

    # ----------------------------------------------------------------------- tokenizer / processor
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self._processor is not None:
                self._tokenizer = getattr(self._processor, "tokenizer", self._processor)
            else:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.source)
        return self._tokenizer

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.source) if self.source else self.tokenizer
        return self._processor

    # ------------------------------------------------------------------------------ placement
    def _store(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu") if self.offload_activations else t

    def _on_device(self, c: BlockCall) -> BlockCall:
        if c.hidden.device == self.device:
            return c
        return BlockCall(c.hidden.to(self.device), c.kwargs)

    @contextlib.contextmanager
    def _rest_on_device(self) -> Iterator[None]:
        """Everything but the decoder blocks on the device (embeddings, vision tower, final norm, head)."""
        if self.device.type == "cpu":
            yield
            return
        layers = self.decoder.layers
        self.decoder.layers = torch.nn.ModuleList()
        try:
            self.model.to(self.device)
        finally:
            self.decoder.layers = layers
        try:
            yield
        finally:
            self.decoder.layers = torch.nn.ModuleList()
            try:
                self.model.to("cpu")
            finally:
                self.decoder.layers = layers
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _onload(self, i: int) -> None:
        self.onloader.onload(i, self.layers[i])

    def _offload(self, i: int) -> None:
        self.onloader.offload(i, self.layers[i])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------- capture
    def _batch_on_device(self, b: Batch) -> dict[str, Any]:
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}

    @torch.no_grad()
    def _capture(self, batches: Sequence[Batch]) -> list[BlockCall]:
        """The first decoder block's inputs, one call per batch (other kwargs: on the device, compute dtype)."""
        captured: list[BlockCall] = []

        class _Stop(Exception):
            pass

        def pre(_mod, args, kwargs):
            kw = dict(kwargs)
            h = args[0] if args else kw.pop("hidden_states")
            for k in ("past_key_values", "past_key_value"):
                if k in kw:
                    kw[k] = None  # blocks are re-run many times: they must not append to a KV cache
            kw["use_cache"] = False
            kw = {k: _cast(v, self.device, self.dtype) for k, v in kw.items()}
            captured.append(BlockCall(self._store(h.to(self.device, self.dtype)), kw))
            raise _Stop

        h = self.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with self._rest_on_device():
                for b in batches:
                    try:
                        self.model(**self._batch_on_device(b), use_cache=False)
                    except _Stop:
                        pass
        finally:
            h.remove()
        if len(captured) != len(batches):
            raise ConfigError("the model did not reach its first decoder block on every calibration batch")
        return captured

    # -------------------------------------------------------------------------------- blocks
    def blocks(self, batches: Sequence[Batch], propagate: str = "calibrated", desc: str = "calibration"
               ) -> Iterator[Block]:
        if propagate not in PROPAGATE:
            raise ConfigError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
        calls = self._capture(batches)
        for i in progress(range(len(self.layers)), desc=desc, total=len(self.layers), unit="block"):
            self._onload(i)
            try:
                blk = Block(self, i, calls)
                outs = blk.run() if propagate == "original" else None
                yield blk
                if blk._outputs is not None:
                    outs = blk._outputs
                elif outs is None:
                    outs = blk.run()
                calls = [BlockCall(self._store(o), c.kwargs) for o, c in zip(outs, calls)]
                del blk, outs
            finally:
                self._offload(i)

    def _layer_outputs(self, batches: Sequence[Batch], attention_fn: AttentionFn | None, desc: str | None,
                       keep: bool) -> tuple[list[BlockCall], list[list[torch.Tensor]]]:
        calls = self._capture(batches)
        kept: list[list[torch.Tensor]] = []
        it = range(len(self.layers))
        for i in (progress(it, desc=desc, total=len(self.layers), unit="block") if desc else it):
            if keep:
                kept.append([c.hidden for c in calls])
            self._onload(i)
            try:
                blk = Block(self, i, calls)
                outs = blk.run(attention=attention_fn)
                calls = [BlockCall(self._store(o), c.kwargs) for o, c in zip(outs, calls)]
            finally:
                self._offload(i)
        return calls, kept

    def _head(self, h: torch.Tensor, positions: slice | None) -> torch.Tensor:
        if positions is not None:
            h = h[:, positions]
        head = self.model.get_output_embeddings()
        norm = self.decoder.norm
        return head(norm(h.to(next(norm.parameters()).dtype)).to(head.weight.dtype))

    @torch.no_grad()
    def forward(self, batches: Sequence[Batch], attention: AttentionFn | None = None, logits: slice | None = None,
                desc: str | None = None) -> list[torch.Tensor]:
        calls, _ = self._layer_outputs(batches, attention, desc, keep=False)
        with self._rest_on_device():
            return [self._head(c.hidden.to(self.device), logits) for c in calls]

    def backward(self, batches: Sequence[Batch], loss: LossFn, *, attention: AttentionFn | None = None,
                 retain: Sequence[str] = (), logits: slice | None = None,
                 visit: Callable[[Block, int, dict[str, tuple[torch.Tensor, torch.Tensor]]], None] | None = None,
                 desc: str | None = None) -> list[float]:
        params = list(self.model.parameters())
        req = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)  # gradients flow to activations only
        try:
            return self._backward(batches, loss, attention, retain, logits, visit, desc)
        finally:
            for p, r in zip(params, req):
                p.requires_grad_(r)

    def _backward(self, batches: Sequence[Batch], loss: LossFn, attention: AttentionFn | None,
                  retain: Sequence[str], logits: slice | None,
                  visit: Callable[[Block, int, dict[str, tuple[torch.Tensor, torch.Tensor]]], None] | None,
                  desc: str | None) -> list[float]:
        with torch.no_grad():
            calls, kept = self._layer_outputs(batches, None, f"{desc}: forward" if desc else None, keep=True)
        grads: list[torch.Tensor] = []
        losses: list[float] = []
        with self._rest_on_device(), torch.enable_grad():
            for j, c in enumerate(calls):
                x = c.hidden.to(self.device).detach().requires_grad_(True)
                value = loss(self._head(x, logits), j)
                if not torch.isfinite(value):
                    raise ConfigError(f"calibration loss is {float(value)} on batch {j}; check the model and data")
                value.backward()
                grads.append(self._store(x.grad.detach()))
                losses.append(float(value.detach()))
        kwargs = [c.kwargs for c in calls]
        del calls
        it = reversed(range(len(self.layers)))
        for i in (progress(it, desc=f"{desc}: backward", total=len(self.layers), unit="block") if desc else it):
            self._onload(i)
            layer = self.layers[i]
            for p in layer.parameters():
                p.requires_grad_(False)  # (onloading may have made new parameter tensors)
            blk = Block(self, i, [])
            try:
                for j, (h, kw) in enumerate(zip(kept[i], kwargs)):
                    held: dict[str, torch.Tensor] = {}
                    hooks = [blk.roles[r].register_forward_hook(_retainer(held, r)) for r in retain]
                    try:
                        x = h.to(self.device).detach().requires_grad_(True)
                        with torch.enable_grad(), using(attention):
                            out = _first(layer(x, **kw))
                        out.backward(grads[j].to(self.device))
                    finally:
                        for hk in hooks:
                            hk.remove()
                    if visit is not None:
                        visit(blk, j, {r: (t.detach(), t.grad) for r, t in held.items()})
                    grads[j] = self._store(x.grad.detach())
                    del out, x
                kept[i] = []
            finally:
                self._offload(i)
        return losses

    # ------------------------------------------------------------------------------- helpers
    def input_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.get_input_embeddings()(ids)

    def ends(self, untie: bool = False) -> ModelEnds:
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        norm = getattr(self.decoder, "norm", None)
        if emb is None or head is None or norm is None:
            raise ConfigError(f"{type(self.model).__name__}: no input embedding, final norm (decoder.norm) or LM head "
                              "where a Llama/Qwen2-style model has them")
        if untie and head.weight is emb.weight:
            head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
            text = self.config.get_text_config(decoder=True) if hasattr(self.config, "get_text_config") else None
            for conf in {id(c): c for c in (self.config, text) if c is not None}.values():
                if hasattr(conf, "tie_word_embeddings"):
                    conf.tie_word_embeddings = False
        return ModelEnds(emb, norm, head)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy: transformers' ``generate`` when the model is on the CPU device, else block by block
        (one block-wise forward per new token, no KV cache: any model size)."""
        if self.device.type == "cpu":
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        out = ids
        for _ in range(new_tokens):
            nxt = self.forward([{"input_ids": out}], logits=slice(-1, None))[0][:, -1].argmax(-1).cpu()
            out = torch.cat([out, nxt[:, None]], dim=1)
        return out

    def resident_model(self) -> torch.nn.Module:
        self.model.to(self.device, self.dtype)
        return self.model

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.model.set_attn_implementation(self._prev_attn)

    def __enter__(self) -> "TransformersCalibration":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _retainer(held: dict[str, torch.Tensor], role: str) -> Callable[..., None]:
    def hook(_m: torch.nn.Module, _args: Any, out: Any) -> None:
        t = _first(out)
        t.retain_grad()
        held[role] = t
    return hook


def load(model: Path | torch.nn.Module, *, device: str = "cpu", dtype: torch.dtype | None = None,
         offload_activations: bool = False, compute_dtype: torch.dtype | None = None, tokenizer: Any = None,
         processor: Any = None) -> TransformersCalibration:
    """A checkpoint folder (or an already built model) ready for block-by-block calibration."""
    if isinstance(model, torch.nn.Module):
        return TransformersCalibration(model, device, compute_dtype or dtype, offload_activations, tokenizer,
                                       processor)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {path}: no config.json (expected a transformers checkpoint directory)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    conf = AutoConfig.from_pretrained(path)
    auto = AutoModelForImageTextToText if hasattr(conf, "vision_config") else AutoModelForCausalLM
    m = auto.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    return TransformersCalibration(m, device, compute_dtype, offload_activations, tokenizer, processor, source=path)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

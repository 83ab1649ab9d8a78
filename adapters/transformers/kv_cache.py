"""transformers side of KV-cache methods (kind ``kv_cache_attention``): one generic ``Cache`` for any method.

    import overdrive.transformers
    cache = overdrive.transformers.kv_cache(model, NAME, plan="plan.json", **options)   # once per generate call
    model.generate(ids, past_key_values=cache)

:func:`kv_cache` is the one public way to get a cache. It asks the method for its per-layer formats
(``KVCacheMethod.cache_formats(cfg, model, **options)``: the plan is checked against the model with an
error naming any mismatch), folds each format's ``q_scale`` into the model's q/k projections (once per
model: the cache sees keys but never queries), and returns an :class:`OverdriveKVCache`. Nothing here
knows a method. Per layer (and per batch row) the cache keeps

* the first ``sink`` tokens at full precision (the model's dtype);
* a recent window at full precision, flushed into the body in whole chunks of ``window`` tokens once it
  holds ``window`` tokens (``window = 0``: every token past the sink is flushed after its step);
* the body: the method's compressed tensors (``KVCacheMethod.compress``), read back through
  ``decompress``. While the layer holds more than ``budget_bytes`` per sequence (times the batch size)
  the body is re-compressed with ``KVCacheMethod.shrink`` (progressive schedules); a method that
  cannot shrink further raises :class:`~overdrive.contracts.kv_cache.KVBudgetError` naming the layer.

Attention in a step sees sink + decompressed body + window + the step's new tokens, all at full
precision except the body: tokens are compressed after the attention that first uses them, as in the
paged engines. Dense formats (``bits = 0``) keep everything at full precision.

With left padding (batched ``generate``) the first cache position of a padded row is a pad token; it
is masked by the attention mask, and compression is per token, so it does not affect other tokens.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers.cache_utils import Cache

import overdrive
from overdrive.config import ConfigError, MethodConfig
from overdrive.contracts.kv_cache import (KVBody, KVBudgetError, KVCacheMethod, LayerKVFormat, ModelIdentity,
                                         attention_modules, fold_qk_scale)
from overdrive.kinds import Kind

from overdrive.adapters._kv_cache import check_formats
from overdrive.adapters.transformers.kv_spans import PAGE_SIZE, GrowingLayer, SpanKVLayer, use_span_attention

_FOLDED = "_overdrive_kv_q_scale"  # instance attribute: digest of the q_scale folded into this model


def kv_cache(model: Any, method: str, plan: str | Path | Mapping[str, Any] | MethodConfig, **options: Any
             ) -> "OverdriveKVCache":
    """A new transformers ``Cache`` implementing KV-cache ``method`` with ``plan`` for ``model``.

    ``options`` go to the method's ``cache_formats`` (e.g. a schedule mode); unknown ones are a ConfigError.
    """
    spec = overdrive.get_method(method, Kind.KV_CACHE)
    impl = spec.load_impl()
    cfg = plan if isinstance(plan, spec.config_cls) else impl.load_config(str(plan) if isinstance(plan, Path) else plan)
    ident = ModelIdentity.from_hf_config(model.config)
    fmts = list(impl.cache_formats(cfg, ident, **options))
    check_formats(fmts, ident, f"{method} plan")
    fold_q_scales(model, impl, fmts, method)
    if any(f.head_spans is not None for f in fmts):
        use_span_attention(model)  # span layers compute attention themselves (the model's own reads every position)
    return OverdriveKVCache(impl, fmts, method)


def fold_q_scales(model: torch.nn.Module, method: KVCacheMethod, fmts: list[LayerKVFormat], name: str) -> int:
    """Fold every format's ``q_scale`` into ``model`` (q rows * s, k rows / s); returns how many layers changed.

    Recorded on the model instance: folding the same scales again is a no-op, other scales are an error."""
    if type(method).transform_qk is not KVCacheMethod.transform_qk:
        raise ConfigError(f"{name} overrides transform_qk; the transformers cache never sees queries and can only "
                          "apply a query/key transform given as LayerKVFormat.q_scale (folded into the weights)")
    scaled = [f for f in fmts if f.q_scale is not None]
    digest = None
    if scaled:
        data = [f.layer.to_bytes(4, "little") + f.q_scale.detach().to("cpu", torch.float64).numpy().tobytes()
                for f in scaled]
        digest = hashlib.sha256(b"".join(data)).hexdigest()
    done = getattr(model, _FOLDED, None)
    if done == digest:
        return 0
    if done is not None:
        raise ConfigError(f"{name}: this model already has other key scales (q_scale) folded in; load it afresh")
    if not scaled:
        return 0
    mods = attention_modules(model)
    for f in scaled:
        half = f.head_size // 2
        if not torch.equal(f.q_scale[:, :half], f.q_scale[:, half:2 * half]):
            raise ConfigError(f"{name}: layer {f.layer} q_scale differs between channels c and c + {half} (a rotary "
                              "pair), so it cannot be folded under the rotary embedding")
        if f.layer not in mods:
            raise ConfigError(f"{name}: no attention module with q_proj/k_proj for layer {f.layer} (found layers "
                              f"{sorted(mods)}), so its q_scale cannot be folded")
    for f in scaled:
        fold_qk_scale(mods[f.layer].q_proj, mods[f.layer].k_proj, f.q_scale)
    setattr(model, _FOLDED, digest)
    return len(scaled)


class OverdriveKVLayer(GrowingLayer):
    """One layer of :class:`OverdriveKVCache` (state is per instance; nothing is kept on the class)."""

    def __init__(self, method: KVCacheMethod, fmt: LayerKVFormat, name: str) -> None:
        super().__init__()
        self.method, self.start_fmt, self.fmt, self.name = method, fmt, fmt, name
        self.length = 0
        self.body: KVBody | None = None
        self.shrink_events: list[tuple[int, int, int]] = []  # (length, bits before, bits after)

    # -- storage ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        _, h, _, d = key_states.shape
        if (h, d) != (self.fmt.num_kv_heads, self.fmt.head_size):
            raise ConfigError(f"{self.name} layer {self.fmt.layer}: the model gives {h} KV heads of size {d}, the "
                              f"format {self.fmt.num_kv_heads} of size {self.fmt.head_size}")
        empty = key_states[:, :, :0]
        self.sink_k, self.sink_v = empty.clone(), empty.clone()
        self.win_k, self.win_v = empty.clone(), empty.clone()
        self.body = None
        self.is_initialized = True

    def body_length(self) -> int:
        return 0 if self.body is None else self.body[0].shape[2]

    def decompressed_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.decompress(self.fmt, self.body, self.dtype)

    def _flush(self, k: torch.Tensor, v: torch.Tensor) -> None:
        parts = tuple(self.method.compress(self.fmt, k, v))
        if any(p.shape[:3] != k.shape[:3] for p in parts):
            raise RuntimeError(f"{self.name}.compress returned shapes {[tuple(p.shape) for p in parts]}; every tensor "
                               f"must be (batch, KV heads, tokens, ...) = {tuple(k.shape[:3])} + (...)")
        self.body = parts if self.body is None else tuple(torch.cat([a, p], dim=2) for a, p in zip(self.body, parts))

    def memory_bytes(self) -> int:
        """Bytes stored for this layer (all rows): full-precision tensors and the compressed body."""
        if not self.is_initialized:
            return 0
        t = [self.sink_k, self.sink_v, self.win_k, self.win_v, *(self.body or ())]
        return sum(x.numel() * x.element_size() for x in t)

    def _enforce_budget(self) -> None:
        if self.fmt.budget_bytes is None:
            return
        rows = self.sink_k.shape[0]
        budget = self.fmt.budget_bytes * rows
        while self.memory_bytes() > budget:
            where = (f"{self.name} layer {self.fmt.layer}: KV cache of {self.memory_bytes()} bytes exceeds its budget "
                     f"of {budget} bytes ({self.fmt.budget_bytes} per sequence x batch {rows})")
            if self.body is None:
                raise KVBudgetError(f"{where}; its full-precision sink and window alone take that much ({self.dtype} "
                                    "tokens): the plan's budget assumed smaller full-precision tokens or a shorter window")
            shrunk = self.method.shrink(self.fmt, self.body)
            if shrunk is None:
                raise KVBudgetError(f"{where} at {self.fmt.bits} bits with {self.length} tokens, and the method "
                                    "cannot shrink it further: make the plan for a longer sequence or a larger budget")
            old = self.fmt.bits
            self.fmt, self.body = shrunk[0], tuple(shrunk[1])
            self.shrink_events.append((self.length, old, self.fmt.bits))

    # -- Cache layer API -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        parts_k, parts_v = [self.sink_k], [self.sink_v]
        if self.body is not None:
            bk, bv = self.decompressed_body()
            parts_k.append(bk.to(self.dtype))
            parts_v.append(bv.to(self.dtype))
        keys = torch.cat([*parts_k, self.win_k, key_states], dim=2)
        values = torch.cat([*parts_v, self.win_v, value_states], dim=2)

        # store the new tokens: fill the sink first, then the window; flush whole chunks
        n = key_states.shape[2]
        take = min(max(self.fmt.sink - self.sink_k.shape[2], 0), n)
        if take:
            self.sink_k = torch.cat([self.sink_k, key_states[:, :, :take]], dim=2)
            self.sink_v = torch.cat([self.sink_v, value_states[:, :, :take]], dim=2)
        self.win_k = torch.cat([self.win_k, key_states[:, :, take:]], dim=2)
        self.win_v = torch.cat([self.win_v, value_states[:, :, take:]], dim=2)
        self.length += n
        if self.fmt.dense:
            pass
        elif self.fmt.window > 0:
            full = (self.win_k.shape[2] // self.fmt.window) * self.fmt.window
            if full:
                self._flush(self.win_k[:, :, :full], self.win_v[:, :, :full])
                self.win_k, self.win_v = self.win_k[:, :, full:].clone(), self.win_v[:, :, full:].clone()
        elif self.win_k.shape[2]:
            self._flush(self.win_k, self.win_v)
            self.win_k, self.win_v = self.win_k[:, :, :0], self.win_v[:, :, :0]
        self._enforce_budget()
        return keys, values

    def _select(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in ("sink_k", "sink_v", "win_k", "win_v"):
            setattr(self, name, fn(getattr(self, name)))
        if self.body is not None:
            self.body = tuple(fn(t) for t in self.body)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.is_initialized = False
        self.length = 0
        self.body = None
        self.fmt = self.start_fmt
        self.shrink_events = []


class OverdriveKVCache(Cache):
    """transformers ``Cache`` of any KV-cache method (see the module docstring); build it with :func:`kv_cache`.

    Layers whose format has ``head_spans`` are :class:`~overdrive.adapters.transformers.kv_spans.SpanKVLayer`
    (per-head paged buffers of ``page_size`` positions; attention through ``overdrive_kv``)."""

    def __init__(self, method: KVCacheMethod, formats: list[LayerKVFormat], name: str, page_size: int = PAGE_SIZE) -> None:
        self.method, self.method_name = method, name
        super().__init__(layers=[SpanKVLayer(f, name, page_size) if f.head_spans is not None
                                 else OverdriveKVLayer(method, f, name) for f in formats])

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    @property
    def formats(self) -> list[LayerKVFormat]:
        """Each layer's current format (progressive schedules shrink it)."""
        return [layer.fmt for layer in self.layers]

    @property
    def layer_bits(self) -> list[int]:
        return [layer.fmt.bits for layer in self.layers]

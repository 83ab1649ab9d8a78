"""PM-KVQ as a transformers ``Cache``: pass ``past_key_values=PMKVQCache(plan, model.config)`` to ``generate``.

Per layer (and per batch row) the cache keeps

* the first ``sink`` tokens at full precision (the model's dtype: 16-bit for fp16/bf16 models);
* a recent window at full precision, flushed into the body in whole chunks of ``window`` tokens
  once it holds ``window`` tokens;
* the body: PM-KVQ codes (:mod:`overdrive.kernels.kv_quant`, one scale/zero per token per group of
  channels), at the layer's current width.

``mode="progressive"`` (the paper's schedule): the body starts at 16 bits; after each update, while
the layer's memory (bytes actually stored, all rows) exceeds its budget (the plan's per-sequence
``budget_bytes`` times the batch size), the whole body is re-quantized to half the width in the
integer domain (16 -> 8 -> 4 -> 2, :func:`overdrive.kernels.kv_requantize`); over budget at 2 bits is
a :class:`PMKVQBudgetError` naming the layer. ``mode="static"``: the body is stored at the plan's
final width from the start (what the vLLM and SGLang backends do).

Attention in a step sees sink + dequantized body + window + the step's new tokens, all at full
precision except the body: tokens are compressed after the attention that first uses them (as in
the paper's code). Flushed chunks are quantized directly at the body's current width.

With left padding (batched ``generate``) the first cache position of a padded row is a pad token;
it is masked by the attention mask, and quantization is per token, so it does not affect other tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.kernels import kv_dequantize, kv_quantize, kv_requantize

from .config import BITS, PMKVQPlan, head_group


class PMKVQBudgetError(RuntimeError):
    """A layer's KV cache exceeds its budget even at 2 bits."""


class PMKVQLayer(CacheLayerMixin):
    """One layer of :class:`PMKVQCache` (state is per instance; nothing is kept on the class)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, layer_idx: int, bits: int, budget_bytes: int | None, group: int, sink: int, window: int,
                 progressive: bool) -> None:
        super().__init__()
        if bits not in BITS:
            raise ConfigError(f"PM-KVQ layer {layer_idx}: bits must be one of {BITS}, got {bits}")
        self.layer_idx, self.group, self.sink, self.window = layer_idx, group, sink, window
        self.progressive = progressive
        self.final_bits = bits
        self.bits = 16 if progressive else bits
        self.budget_bytes = budget_bytes
        self.length = 0
        self.requant_events: list[tuple[int, int, int]] = []  # (length, from bits, to bits)

    # -- storage ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if d % self.group:
            raise ConfigError(f"PM-KVQ layer {self.layer_idx}: head size {d} is not a multiple of group {self.group}")
        self.head_size = d
        empty = key_states.new_zeros(b, h, 0, d)
        self.sink_k, self.sink_v = empty, empty.clone()
        self.win_k, self.win_v = empty.clone(), empty.clone()
        self.body: list[torch.Tensor] | None = None  # [kp, ks, kz, vp, vs, vz] along dim 2
        self.is_initialized = True

    def _body_len(self) -> int:
        return 0 if self.body is None else self.body[0].shape[2]

    def _dequant_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        kp, ks, kz, vp, vs, vz = self.body
        d = self.head_size
        k = kv_dequantize(kp, ks, kz, self.bits, d, self.group, self.dtype)
        v = kv_dequantize(vp, vs, vz, self.bits, d, self.group, self.dtype)
        return k, v

    def _flush(self, k: torch.Tensor, v: torch.Tensor) -> None:
        parts = [*kv_quantize(k, self.bits, self.group), *kv_quantize(v, self.bits, self.group)]
        self.body = parts if self.body is None else [torch.cat([a, p], dim=2) for a, p in zip(self.body, parts)]

    def memory_bytes(self) -> int:
        """Bytes stored for this layer (all rows): full-precision tensors, codes, scales and zeros."""
        if not self.is_initialized:
            return 0
        t = [self.sink_k, self.sink_v, self.win_k, self.win_v, *(self.body or [])]
        return sum(x.numel() * x.element_size() for x in t)

    def _enforce_budget(self) -> None:
        if self.budget_bytes is None:
            return
        budget = self.budget_bytes * self.sink_k.shape[0]
        while self.memory_bytes() > budget:
            if self.body is None:
                raise PMKVQBudgetError(
                    f"PM-KVQ layer {self.layer_idx}: its full-precision sink and window alone take "
                    f"{self.memory_bytes()} bytes, over its budget of {budget} bytes ({self.budget_bytes} per sequence "
                    f"x batch {self.sink_k.shape[0]}, {self.dtype} tokens); the plan's budget assumed "
                    "smaller full-precision tokens or a shorter window")
            if not self.progressive or self.bits == 2:
                raise PMKVQBudgetError(
                    f"PM-KVQ layer {self.layer_idx}: KV cache of {self.memory_bytes()} bytes exceeds its budget of "
                    f"{budget} bytes ({self.budget_bytes} per sequence x batch {self.sink_k.shape[0]}) at "
                    f"{self.bits} bits with {self.length} tokens; below 2 bits is not supported — calibrate the "
                    "plan for a longer --max-len or a larger --budget")
            kp, ks, kz, vp, vs, vz = self.body
            d = self.head_size
            kp, ks = kv_requantize(kp, ks, self.bits, d)
            vp, vs = kv_requantize(vp, vs, self.bits, d)
            self.body = [kp, ks, kz, vp, vs, vz]
            self.requant_events.append((self.length, self.bits, self.bits // 2))
            self.bits //= 2

    # -- Cache layer API -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        parts_k, parts_v = [self.sink_k], [self.sink_v]
        if self.body is not None:
            bk, bv = self._dequant_body()
            parts_k.append(bk)
            parts_v.append(bv)
        keys = torch.cat([*parts_k, self.win_k, key_states], dim=2)
        values = torch.cat([*parts_v, self.win_v, value_states], dim=2)

        # store the new tokens: fill the sink first, then the window; flush whole chunks
        n = key_states.shape[2]
        take = min(max(self.sink - self.sink_k.shape[2], 0), n)
        if take:
            self.sink_k = torch.cat([self.sink_k, key_states[:, :, :take]], dim=2)
            self.sink_v = torch.cat([self.sink_v, value_states[:, :, :take]], dim=2)
        self.win_k = torch.cat([self.win_k, key_states[:, :, take:]], dim=2)
        self.win_v = torch.cat([self.win_v, value_states[:, :, take:]], dim=2)
        self.length += n
        if self.window > 0:
            full = (self.win_k.shape[2] // self.window) * self.window
            if full:
                self._flush(self.win_k[:, :, :full], self.win_v[:, :, :full])
                self.win_k, self.win_v = self.win_k[:, :, full:].clone(), self.win_v[:, :, full:].clone()
        elif self.win_k.shape[2]:
            self._flush(self.win_k, self.win_v)
            self.win_k, self.win_v = self.win_k[:, :, :0], self.win_v[:, :, :0]
        self._enforce_budget()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def _all(self) -> list[str]:
        return ["sink_k", "sink_v", "win_k", "win_v"]

    def _select(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self._all():
            setattr(self, name, fn(getattr(self, name)))
        if self.body is not None:
            self.body = [fn(t) for t in self.body]

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
        self.bits = 16 if self.progressive else self.final_bits
        self.requant_events = []


class PMKVQCache(Cache):
    """transformers ``Cache`` implementing PM-KVQ (see the module docstring).

    ``plan``: a :class:`PMKVQPlan` or the path of its JSON; checked against ``config`` (layers, KV
    heads, head size) with an error naming the mismatch. Without a plan, ``bits`` gives every layer
    the same static width (no budget) — useful for measuring one width on its own.
    Apply the plan's key scales to the model first (:func:`overdrive.pmkvq.apply`).
    """

    def __init__(self, plan: PMKVQPlan | str | Path | None, config, mode: Literal["progressive", "static"] = "progressive",
                 bits: int | None = None, sink: int | None = None, window: int | None = None) -> None:
        if mode not in ("progressive", "static"):
            raise ConfigError(f"PMKVQCache: mode must be 'progressive' or 'static', got {mode!r}")
        ident = ModelIdentity.from_hf_config(config)
        if isinstance(plan, (str, Path)):
            plan = PMKVQPlan.load(plan)
        if plan is not None:
            plan.check_model(ident)
            group = head_group(ident.head_size, plan.group_size)
            sink = plan.sink if sink is None else sink
            window = plan.window if window is None else window
            layers = [PMKVQLayer(i, plan.layer_bits[i], plan.layer_budgets[i] if mode == "progressive" else None,
                                 group, sink, window, mode == "progressive")
                      for i in range(ident.num_layers)]
        else:
            if bits is None:
                raise ConfigError("PMKVQCache: give a plan, or bits= for a static width on every layer")
            group = head_group(ident.head_size)
            layers = [PMKVQLayer(i, bits, None, group, 1 if sink is None else sink, 128 if window is None else window,
                                 False) for i in range(ident.num_layers)]
        self.plan = plan
        self.mode = mode
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    @property
    def layer_bits(self) -> list[int]:
        return [layer.bits for layer in self.layers]

"""transformers side of per-head span formats (``LayerKVFormat.head_spans``): a cache layer with per-head
paged ring buffers and the attention function that reads it. Generic: only the contract's ``HeadSpans``
rule (via ``LayerKVFormat.span_starts``) and ``sink`` are used; no method is named here.

How a span layer runs a step (the model's attention implementation is ``overdrive_kv``, switched by
:func:`overdrive.transformers.kv_cache` when a format has spans):

1. ``Cache.update`` hands the step's K/V to the layer (returned unchanged; nothing is stored yet) and
   marks the layer as the one the next attention call of this thread serves;
2. the attention function (:func:`span_attention`) gives the layer the step's queries and the 2-D padding
   mask (the mask function registered for ``overdrive_kv`` returns it as is): real tokens get positions
   counted per row without pads (as vLLM numbers them), so left-padded batches follow the same rule;
3. a first step of every row (a prompt) runs block-sparse span attention over its own tokens
   (``span_prefill_attention``) and then stores only the (token, head) pairs a later query can read; any
   other step stores its tokens first and reads the pages (``span_paged_attention``: per head, only the
   sink and the window);
4. pages (``page_size`` positions of one head of one row) that hold no sink position and lie wholly before
   the head's window start of the next query are returned to the free list: the span never moves back,
   so each head keeps about ``sink + S_h(N)`` positions (rounded to pages), a per-head circular buffer in
   page granularity. Memory is what the heads keep, not the sequence length.

Attention calls that do not come from a span layer (a layer without spans in the same cache, a forward
without this cache) get dense causal attention with the padding mask, i.e. what ``sdpa`` computes.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import LayerKVFormat
from overdrive.kernels.span_attention import span_paged_attention, span_prefill_attention

ATTN_NAME = "overdrive_kv"
PAGE_SIZE = 16
_HANDOFF = threading.local()  # the span layer whose update came last in this thread, until attention takes it
_REGISTERED = False


# ----------------------------------------------------------------------------- attention function
def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function of ``overdrive_kv``: the 2-D padding mask ``(batch, kv_length)`` (bool) or None."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask

    if mask_function is not None and mask_function is not causal_mask_function:
        raise ConfigError(f"attention implementation {ATTN_NAME!r} handles plain causal decoders only; this model asks "
                          f"for another mask pattern ({getattr(mask_function, '__name__', mask_function)!r}: sliding "
                          "windows, packed sequences or bidirectional spans)")
    if attention_mask is None:
        return None
    return prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)[:, :kv_length]


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pad: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Causal attention of the last ``n`` of ``kv`` positions, padding masked: q (B, Hq, n, D) -> (B, n, Hq, D)."""
    b, hq, n, d = query.shape
    kv = key.shape[2]
    allowed = torch.arange(kv, device=query.device)[None, :] <= (kv - n + torch.arange(n, device=query.device))[:, None]
    mask = allowed[None, None]
    if pad is not None:
        mask = mask & pad[:, None, None, :kv]
    rep = hq // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(query, k.to(query.dtype), v.to(query.dtype), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).nan_to_num(0.0)  # rows of pad queries see nothing


def span_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function ``overdrive_kv`` (q/k/v are (B, H, S, D); returns (B, S, H, D), None)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ConfigError(f"attention implementation {ATTN_NAME!r} takes the 2-D padding mask, got a "
                          f"{attention_mask.dim()}-D mask (custom 4-D masks are not supported)")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    layer = getattr(_HANDOFF, "layer", None)
    if layer is not None and layer.fmt.layer == getattr(module, "layer_idx", None):
        _HANDOFF.layer = None
        return layer.attend(query, attention_mask, scale), None
    return dense_attention(query, key, value, attention_mask, scale), None


def register_span_attention() -> None:
    """Register ``overdrive_kv`` (attention and mask functions) with transformers, once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, span_attention)
    AttentionMaskInterface.register(ATTN_NAME, padding_mask)
    _REGISTERED = True


def use_span_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` (this instance) to ``overdrive_kv``; attention outside a span layer stays dense."""
    register_span_attention()
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


# ------------------------------------------------------------------------------------ cache layer
class GrowingLayer(CacheLayerMixin):
    """What overdrive's transformers cache layers share: they grow by every token stored (``length``),
    cannot be cropped or compiled, and have no maximum length."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    length: int

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


class SpanKVLayer(GrowingLayer):
    """One layer of a span format (module docstring); state is per instance."""

    def __init__(self, fmt: LayerKVFormat, name: str, page_size: int = PAGE_SIZE) -> None:
        super().__init__()
        if fmt.head_spans is None:
            raise ValueError("SpanKVLayer needs a format with head_spans")
        if page_size < 1:
            raise ConfigError(f"span cache page size must be >= 1, got {page_size}")
        self.fmt, self.name, self.bs = fmt, name, page_size
        self.length = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- storage ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if (h, d) != (self.fmt.num_kv_heads, self.fmt.head_size):
            raise ConfigError(f"{self.name} layer {self.fmt.layer}: the model gives {h} KV heads of size {d}, the "
                              f"format {self.fmt.num_kv_heads} of size {self.fmt.head_size}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_pool = key_states.new_zeros(0, 1, self.bs, d)
        self.v_pool = key_states.new_zeros(0, 1, self.bs, d)
        self.free: list[int] = []
        self.table = torch.full((b, h, 0), -1, dtype=torch.int32, device=self.device)
        self.real = torch.zeros(b, dtype=torch.long, device=self.device)  # tokens per row, pads excluded
        self.is_initialized = True

    def _take(self, count: int) -> torch.Tensor:
        if len(self.free) < count:
            have = self.k_pool.shape[0]
            grow = max(count - len(self.free), have, 8)
            extra = self.k_pool.new_zeros(grow, *self.k_pool.shape[1:])
            self.k_pool = torch.cat([self.k_pool, extra])
            self.v_pool = torch.cat([self.v_pool, extra.clone()])
            self.free.extend(range(have + grow - 1, have - 1, -1))
        got, self.free = self.free[len(self.free) - count:], self.free[:len(self.free) - count]
        return torch.tensor(got, dtype=torch.int32, device=self.device)

    def _store(self, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> None:
        """Write tokens (T,) of ``rows`` at ``pos`` (K/V (T, Hk, D)) for the (token, head) pairs in ``keep``."""
        hk = self.fmt.num_kv_heads
        need_blocks = int(pos.max()) // self.bs + 1 if pos.numel() else 0
        if need_blocks > self.table.shape[2]:
            grow = torch.full((*self.table.shape[:2], need_blocks - self.table.shape[2]), -1, dtype=torch.int32,
                              device=self.device)
            self.table = torch.cat([self.table, grow], dim=2)
        heads = torch.arange(hk, device=self.device)[None, :].expand_as(keep)
        r, h, blk = rows[:, None].expand_as(keep)[keep], heads[keep], (pos // self.bs)[:, None].expand_as(keep)[keep]
        need = torch.zeros(self.table.shape, dtype=torch.bool, device=self.device)
        need[r, h, blk] = True
        need &= self.table < 0
        count = int(need.sum())
        if count:
            self.table[need] = self._take(count)
        page = self.table[r, h, blk].to(torch.long)
        off = pos[:, None].expand_as(keep)[keep] % self.bs
        self.k_pool[page, 0, off] = k[keep].to(self.dtype)
        self.v_pool[page, 0, off] = v[keep].to(self.dtype)

    def _evict(self) -> None:
        """Free pages that no later query of their head reads (no sink position, wholly before the start)."""
        if not self.table.shape[2]:
            return
        st = self.fmt.span_starts(self.real + 1)  # (B, Hk): the next query's window start
        lo = torch.arange(self.table.shape[2], device=self.device) * self.bs
        gone = (lo >= self.fmt.sink)[None, None, :] & ((lo + self.bs)[None, None, :] <= st[:, :, None]) & (self.table >= 0)
        if bool(gone.any()):
            self.free.extend(self.table[gone].tolist())
            self.table[gone] = -1

    # -- a step ----------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, pad: torch.Tensor | None, scale: float) -> torch.Tensor:
        """The step's attention (queries (B, Hq, n, D)) over this layer; stores and evicts. Returns (B, n, Hq, D)."""
        if self.pending is None:
            raise RuntimeError(f"{self.name} layer {self.fmt.layer}: attention without a cache update")
        k, v = self.pending
        self.pending = None
        b, hq, n, d = query.shape
        first = self.length - n
        flags = (torch.ones(b, n, dtype=torch.bool, device=query.device) if pad is None
                 else pad[:, first:first + n].to(torch.bool))
        fresh = bool((self.real == 0).all())
        pos = self.real[:, None] + flags.long().cumsum(1) - 1
        rows, cols = flags.nonzero(as_tuple=True)  # row-major: each row's tokens together, in order
        p = pos[rows, cols]
        q_t = query[rows, :, cols]  # (T, Hq, D)
        k_t, v_t = k[rows, :, cols], v[rows, :, cols]  # (T, Hk, D)
        starts = self.fmt.span_starts(p + 1)
        self.real = self.real + flags.sum(1)
        if fresh:
            counts = flags.sum(1).tolist()
            cu = [0]
            for c in counts:
                cu.append(cu[-1] + c)
            out_t = span_prefill_attention(q_t, k_t.to(query.dtype), v_t.to(query.dtype), cu, starts, self.fmt.sink,
                                           scale)
            nxt = self.fmt.span_starts(self.real + 1)[rows]  # (T, Hk)
            keep = (p[:, None] < self.fmt.sink) | (p[:, None] >= nxt)
            if p.numel():
                self._store(rows, p, k_t, v_t, keep)
        else:
            if p.numel():
                self._store(rows, p, k_t, v_t, torch.ones_like(starts, dtype=torch.bool))
            out_t = span_paged_attention(q_t, self.k_pool, self.v_pool, self.table, rows, p, starts, self.fmt.sink,
                                         scale)
            self._evict()
        out = query.new_zeros(b, n, hq, d)
        out[rows, cols] = out_t.to(query.dtype)
        return out

    def positions_kept(self) -> torch.Tensor:
        """(B, Hk): positions each head of each row still holds (sink + window, exact, not rounded to pages)."""
        st = self.fmt.span_starts(self.real + 1)
        n = self.real[:, None]
        return torch.clamp(n, max=self.fmt.sink) + (n - st).clamp_min(0)

    def memory_bytes(self) -> int:
        """Bytes of the pages in use (all rows and heads), K and V."""
        if not self.is_initialized:
            return 0
        used = int((self.table >= 0).sum())
        return used * 2 * self.bs * self.fmt.head_size * self.k_pool.element_size()

    # -- Cache layer API -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise ConfigError(f"{self.name} layer {self.fmt.layer}: the previous step's attention did not read the span "
                              f"cache; the model's attention implementation must be {ATTN_NAME!r} (set by "
                              "overdrive.transformers.kv_cache; do not change it while the cache is in use)")
        self.pending = (key_states, value_states)
        self.length += key_states.shape[2]
        _HANDOFF.layer = self
        return key_states, value_states

    def _select(self, rows: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        table = self.table[rows]
        used = table >= 0
        pages = table[used].to(torch.long)  # a row selected twice gets its own copy of each page
        self.k_pool, self.v_pool = self.k_pool[pages].clone(), self.v_pool[pages].clone()
        self.table = torch.full_like(table, -1)
        self.table[used] = torch.arange(pages.numel(), dtype=torch.int32, device=self.device)
        self.free = []
        self.real = self.real[rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.table.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices, device=self.device))

    def reset(self) -> None:
        self.is_initialized = False
        self.length = 0
        self.pending = None

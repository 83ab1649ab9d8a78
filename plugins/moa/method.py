"""MoA's implementation of the KV-cache contract: dense K/V, per-KV-head elastic spans (``HeadSpans``).

Every layer's format is dense (``bits = 0``, the engine's own cell) with ``head_spans`` from the plan,
sliced to the KV heads of a tensor-parallel rank. What reads them:

* vLLM (paged): :meth:`MoAMethod.attend` first writes the step's K/V into the page cells (cell = K then V
  in the activation dtype), then computes attention through :mod:`overdrive.kernels.span_attention`: rows
  that start a sequence in this step use the block-sparse prefill over their own tokens, every other
  query (decode, chunked prefill, a prefix-cache hit) the paged kernel, which reads only the sink and the
  head's window. The span of a query is that of its own length (position + 1), see ``HeadSpans``.
* SGLang and transformers: the adapters' generic span attention (no MoA code).

Memory in vLLM: the page of a position holds all KV heads of a layer, and vLLM's block manager frees a
request's pages only when it finishes (its one per-layer freeing rule, the sliding-window manager, drops
a fixed window's outside, sink included, while MoA spans grow with the length), so nothing is released:
the saving is the bytes read per step (and the attention FLOPs), not the allocation. docs/methods/moa.md
has the numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import KVCacheMethod, LayerKVFormat, ModelIdentity, PagedBatch
from overdrive.kernels.span_attention import span_paged_attention, span_prefill_attention

from .config import MoAPlan

NAME = "moa"


def kv_views(pages: torch.Tensor, dtype: torch.dtype, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``(blocks, Hk, block size, D)`` of dense page cells (uint8 ``(blocks, Hk, bs, 2*D*elem)``)."""
    want = 2 * head_size * torch.tensor([], dtype=dtype).element_size()
    if pages.shape[-1] != want:
        raise ConfigError(f"MoA: page cells hold {pages.shape[-1]} bytes, expected {want} (K and V of head size "
                          f"{head_size} in {dtype}); run with --kv-cache-dtype auto")
    cells = pages.view(dtype)
    return cells[..., :head_size], cells[..., head_size:]


class MoAMethod(KVCacheMethod):
    def load_config(self, source: str | Path | Mapping[str, Any] | MoAPlan) -> MoAPlan:
        if isinstance(source, MoAPlan):
            return source
        if isinstance(source, Mapping):
            return MoAPlan.from_dict(source, source="MoA plan")
        return MoAPlan.load(source)

    def layer_formats(self, cfg: MoAPlan, model: ModelIdentity, *, tp_rank: int = 0,
                      tp_size: int = 1) -> list[LayerKVFormat]:
        cfg.check_model(model)
        first, per = model.kv_heads_for_rank(tp_rank, tp_size, source="MoA")
        d = model.head_size
        return [LayerKVFormat(layer=i, num_kv_heads=per, head_size=d, bits=0, group=d, sink=cfg.sink, window=0,
                              cell_bytes=0, head_spans=cfg.head_spans(i).select(first, per))
                for i in range(model.num_layers)]

    # -- paged engines -------------------------------------------------------------------------------
    def store(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, k: torch.Tensor,
              v: torch.Tensor) -> None:
        slots = batch.slot_mapping.to(torch.long)
        n = slots.shape[0]
        keep = slots >= 0
        if not bool(keep.all()):
            slots, k, v = slots[keep], k[:n][keep], v[:n][keep]
        else:
            k, v = k[:n], v[:n]
        if not slots.numel():
            return
        kc, vc = kv_views(pages, k.dtype, fmt.head_size)
        bs = pages.shape[2]
        kc[slots // bs, :, slots % bs] = k
        vc[slots // bs, :, slots % bs] = v

    def attend(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float, fp_pool: torch.Tensor | None = None) -> torch.Tensor:
        n = q.shape[0]
        self.store(fmt, pages, batch, k, v)  # every query below reads its keys (its own included) from the pages
        kc, vc = kv_views(pages, k.dtype, fmt.head_size)
        qsl = batch.host_query_start_loc or batch.query_start_loc.tolist()
        prev = batch.host_prev_lens or batch.prev_lens.tolist()
        rows = len(qsl) - 1
        fresh = [r for r in range(rows) if prev[r] == 0 and qsl[r + 1] - qsl[r] > 1]
        rest = [r for r in range(rows) if r not in fresh and qsl[r + 1] > qsl[r]]
        dev = q.device
        out = torch.empty_like(q)
        if fresh:  # whole prompts: block-sparse over their own K/V
            idx = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in fresh]).to(dev)
            cu = [0]
            for r in fresh:
                cu.append(cu[-1] + qsl[r + 1] - qsl[r])
            pos = torch.cat([torch.arange(qsl[r + 1] - qsl[r]) for r in fresh]).to(dev)
            out[idx] = span_prefill_attention(q[idx], k[:n][idx], v[:n][idx], cu, fmt.span_starts(pos + 1), fmt.sink,
                                              scale)
        if rest:
            if len(rest) == rows and all(qsl[r + 1] - qsl[r] == 1 for r in rest):  # pure decode: no index copies
                idx = None
                row = torch.arange(rows, device=dev)
                pos = torch.tensor(prev, device=dev)
            else:
                idx = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in rest]).to(dev)
                row = torch.cat([torch.full((qsl[r + 1] - qsl[r],), r) for r in rest]).to(dev)
                pos = torch.cat([torch.arange(prev[r], prev[r] + qsl[r + 1] - qsl[r]) for r in rest]).to(dev)
            got = span_paged_attention(q if idx is None else q[idx], kc, vc, batch.block_table, row, pos,
                                       fmt.span_starts(pos + 1), fmt.sink, scale)
            if idx is None:
                out = got
            else:
                out[idx] = got
        return out


METHOD = MoAMethod()

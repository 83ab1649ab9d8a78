"""PM-KVQ's runtime for paged engines: the KV-cache contract over overdrive.kernels.kv_attention.

Each layer stores a token's K/V for one KV head as one page cell of ``cell_words`` int32 words
(layout in :mod:`overdrive.kernels.kv_attention`) at the plan's final width for that layer
(static per-layer bits: a page has a fixed size, see docs/methods/pmkvq.md for why the progressive
re-quantization of aging blocks cannot live in a paged layout). The sink and the recent window are
read at full precision from a full-precision store the adapter keeps beside the pages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import KVCacheMethod, LayerKVFormat, ModelIdentity, PagedBatch
from overdrive.kernels.kv_attention import cell_words, kv_cache_store, paged_kv_attention

from .config import PMKVQPlan, head_group

NAME = "pmkvq"


class PMKVQMethod(KVCacheMethod):
    def load_config(self, source: str | Path | Mapping[str, Any] | PMKVQPlan) -> PMKVQPlan:
        if isinstance(source, PMKVQPlan):
            return source
        if isinstance(source, Mapping):
            return PMKVQPlan.from_dict(source, source="PM-KVQ plan")
        return PMKVQPlan.load(source)

    def layer_formats(self, cfg: PMKVQPlan, model: ModelIdentity, *, tp_rank: int = 0,
                      tp_size: int = 1) -> list[LayerKVFormat]:
        cfg.check_model(model)
        group = head_group(model.head_size, cfg.group_size)
        hk = model.num_kv_heads
        if hk % tp_size and tp_size % hk:
            raise ConfigError(f"PM-KVQ: {hk} KV heads cannot be split over tensor-parallel size {tp_size}")
        if tp_size <= hk:
            per, first = hk // tp_size, tp_rank * (hk // tp_size)
        else:  # KV heads replicated: rank r holds head r * hk // tp_size
            per, first = 1, tp_rank * hk // tp_size
        out = []
        for i, entry in enumerate(cfg.layers):
            bits = int(entry["bits"])
            ks = entry.get("key_scale")
            scale = None if ks is None else torch.tensor(ks, dtype=torch.float32)[first:first + per].contiguous()
            out.append(LayerKVFormat(layer=i, num_kv_heads=per, head_size=model.head_size, bits=bits, group=group,
                                     sink=cfg.sink, window=cfg.window,
                                     cell_bytes=4 * cell_words(model.head_size, bits, group), q_scale=scale))
        return out

    def transformers_cache(self, model: Any, cfg: PMKVQPlan, mode: str = "progressive", **options: Any) -> Any:
        """Fold the plan's key scales into ``model`` (once) and return a new PMKVQCache."""
        from .cache import PMKVQCache
        from .reparam import fold_scales

        fold_scales(model, cfg)
        return PMKVQCache(cfg, model.config, mode=mode, **options)

    @staticmethod
    def transform_qk(fmt: LayerKVFormat, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the key scale: q (N, Hq, D) * s, k (N, Hk, D) / s (s per KV head and channel)."""
        if fmt.q_scale is None:
            return q, k
        s = fmt.q_scale.to(device=q.device)
        rep = q.shape[1] // k.shape[1]
        q = (q.float() * s.repeat_interleave(rep, 0)).to(q.dtype)
        k = (k.float() / s).to(k.dtype)
        return q, k

    def store(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, k: torch.Tensor, v: torch.Tensor,
              fp_pool: torch.Tensor | None = None) -> None:
        n = batch.slot_mapping.shape[0]
        kv_cache_store(pages, batch.slot_mapping, k[:n], v[:n], fmt.bits, fmt.group)
        if fp_pool is not None and batch.fp_write_index is not None and batch.fp_write_index.numel():
            bs = fp_pool.shape[2]
            idx = batch.fp_write_index.to(torch.long)
            dst = batch.fp_write_slot.to(torch.long)
            fp_pool[dst // bs, :, dst % bs] = torch.cat([k[idx], v[idx]], dim=-1).to(fp_pool.dtype)

    def attend(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float, fp_pool: torch.Tensor | None = None) -> torch.Tensor:
        fp = fp_pool is not None and batch.fp_block_table is not None
        qsl = batch.query_start_loc if batch.host_query_start_loc is None else batch.host_query_start_loc
        return paged_kv_attention(q, k, v, pages, batch.block_table, batch.prev_lens, qsl, fmt.bits, fmt.group, scale,
                                  fp_pool if fp else None, batch.fp_block_table if fp else None,
                                  batch.fp_from if fp else None, fmt.sink, batch.sink_ok if fp else None,
                                  host_prev_lens=batch.host_prev_lens)


METHOD = PMKVQMethod()

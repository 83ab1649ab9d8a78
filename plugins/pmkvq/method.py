"""PM-KVQ's implementation of the KV-cache contract, over overdrive.kernels.kv_quant / kv_attention.

Paged engines (vLLM): each layer stores a token's K/V for one KV head as one page cell of
``cell_words`` int32 words (layout in :mod:`overdrive.kernels.kv_attention`) at the plan's final width
for that layer (static per-layer bits: a page has a fixed size, see docs/methods/pmkvq.md for why the
progressive re-quantization of aging blocks cannot live in a paged layout). The sink and the recent
window are read at full precision from the store the adapter keeps beside the pages.

In-place compression (SGLang, the transformers cache): the body is ``(K codes, K scale, K zero, V codes,
V scale, V zero)`` from :func:`overdrive.kernels.kv_quantize`; ``shrink`` halves its width in the integer
domain (16 -> 8 -> 4 -> 2, :func:`overdrive.kernels.kv_requantize`). ``cache_formats(mode="progressive")``
starts every layer at 16 bits with the plan's per-layer budget (the paper's schedule);
``mode="static"`` stores the final width from the start (what the engines do).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import KVBody, KVCacheMethod, LayerKVFormat, ModelIdentity, PagedBatch, PagedGeometry
from overdrive.kernels.kv_attention import cell_words, kv_cache_store, paged_kv_attention
from overdrive.kernels.kv_quant import kv_dequantize, kv_quantize, kv_requantize

from .config import PMKVQPlan, head_group

NAME = "pmkvq"
MODES = ("progressive", "static")

#: what the kernels take: head sizes that are multiples of 32 (the scale/zero group), blocks walked in
#: tiles of 16 tokens by the Triton decode kernel
GEOMETRY = PagedGeometry(head_sizes=tuple(range(32, 513, 32)), block_multiple=16)


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
        first, per = model.kv_heads_for_rank(tp_rank, tp_size, source="PM-KVQ")
        out = []
        for i, entry in enumerate(cfg.layers):
            bits = int(entry["bits"])
            ks = entry.get("key_scale")
            scale = None if ks is None else torch.tensor(ks, dtype=torch.float32)[first:first + per].contiguous()
            out.append(LayerKVFormat(layer=i, num_kv_heads=per, head_size=model.head_size, bits=bits, group=group,
                                     sink=cfg.sink, window=cfg.window,
                                     cell_bytes=4 * cell_words(model.head_size, bits, group), q_scale=scale))
        return out

    def cache_formats(self, cfg: PMKVQPlan, model: ModelIdentity, mode: str = "progressive",
                      **options: Any) -> list[LayerKVFormat]:
        """``mode="progressive"``: start at 16 bits, budget = the plan's per-layer ``budget_bytes``;
        ``"static"``: the plan's final widths from the start, no budget."""
        if options:
            raise ConfigError(f"PM-KVQ cache: unknown option(s) {sorted(options)} (it takes mode={MODES})")
        if mode not in MODES:
            raise ConfigError(f"PM-KVQ cache: mode must be one of {MODES}, got {mode!r}")
        fmts = self.layer_formats(cfg, model)
        if mode == "static":
            return fmts
        return [self._at_bits(f, 16, budget_bytes=cfg.layer_budgets[f.layer]) for f in fmts]

    def paged_geometry(self) -> PagedGeometry:
        return GEOMETRY

    # -- paged engines -------------------------------------------------------------------------------
    def store(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, k: torch.Tensor,
              v: torch.Tensor) -> None:
        n = batch.slot_mapping.shape[0]
        kv_cache_store(pages.view(torch.int32), batch.slot_mapping, k[:n], v[:n], fmt.bits, fmt.group)

    def attend(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float, fp_pool: torch.Tensor | None = None) -> torch.Tensor:
        fp = fp_pool is not None and batch.fp_block_table is not None
        qsl = batch.query_start_loc if batch.host_query_start_loc is None else batch.host_query_start_loc
        return paged_kv_attention(q, k, v, pages.view(torch.int32), batch.block_table, batch.prev_lens, qsl, fmt.bits,
                                  fmt.group, scale, fp_pool if fp else None, batch.fp_block_table if fp else None,
                                  batch.fp_from if fp else None, fmt.sink, batch.sink_ok if fp else None,
                                  host_prev_lens=batch.host_prev_lens)

    # -- in-place compression ------------------------------------------------------------------------
    def compress(self, fmt: LayerKVFormat, k: torch.Tensor, v: torch.Tensor) -> KVBody:
        return (*kv_quantize(k, fmt.bits, fmt.group), *kv_quantize(v, fmt.bits, fmt.group))

    def decompress(self, fmt: LayerKVFormat, body: KVBody, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        kp, ks, kz, vp, vs, vz = body
        d = fmt.head_size
        return (kv_dequantize(kp, ks, kz, fmt.bits, d, fmt.group, dtype),
                kv_dequantize(vp, vs, vz, fmt.bits, d, fmt.group, dtype))

    def shrink(self, fmt: LayerKVFormat, body: KVBody) -> tuple[LayerKVFormat, KVBody] | None:
        """b -> b/2 on the integer codes (scale * (2^(b/2) + 1), zero kept); None at 2 bits."""
        if fmt.bits <= 2:
            return None
        kp, ks, kz, vp, vs, vz = body
        kp, ks = kv_requantize(kp, ks, fmt.bits, fmt.head_size)
        vp, vs = kv_requantize(vp, vs, fmt.bits, fmt.head_size)
        return self._at_bits(fmt, fmt.bits // 2), (kp, ks, kz, vp, vs, vz)

    @staticmethod
    def _at_bits(fmt: LayerKVFormat, bits: int, **changes: Any) -> LayerKVFormat:
        return dataclasses.replace(fmt, bits=bits, cell_bytes=4 * cell_words(fmt.head_size, bits, fmt.group),
                                   **changes)


METHOD = PMKVQMethod()

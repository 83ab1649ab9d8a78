"""Per-token symmetric int8 KV cache with a full-precision sink: the KV-cache contract in ~150 lines.

Deliberately unlike PM-KVQ: symmetric codes (no zero point), one scale per (token, KV head), no recent
window (every token past the sink is compressed as soon as its own step has attended to it), no key
reparameterisation, any head size and block size, plain torch attention (no kernel).

Plan (``--additional-config '{"example_int8kv": {"plan": "int8kv.json"}}'`` in vLLM,
``overdrive.transformers.kv_cache(model, "example_int8kv", plan=...)`` in transformers)::

    {"version": 1, "sink": 4, "model": {...optional ModelIdentity fields, checked when given...}}

Quantizer, per token and KV head: ``scale = max|x| / 127`` (at least 1e-8), ``code = round(x / scale)``
clipped to [-127, 127], ``x' = code * scale``. Page cell of one (token, KV head), bytes::

    [ K codes: D int8 | V codes: D int8 | K scale: float32 | V scale: float32 | padding to 4 ]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from overdrive.contracts.kv_cache import KVBody, KVCacheMethod, LayerKVFormat, ModelIdentity, PagedBatch

from .configs import Int8KVConfig

NAME = "example_int8kv"


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> int8 codes (..., D) and float32 scale (..., 1)."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x32 / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.to(torch.float32) * scale).to(dtype)


def cell_bytes(head_size: int) -> int:
    return -(-(2 * head_size + 8) // 4) * 4


def pack_cells(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K/V (..., D) -> page cells (..., cell_bytes) uint8."""
    d = k.shape[-1]
    (kq, ks), (vq, vs) = quantize(k), quantize(v)
    out = torch.zeros(*k.shape[:-1], cell_bytes(d), dtype=torch.uint8, device=k.device)
    out[..., :d] = kq.view(torch.uint8)
    out[..., d:2 * d] = vq.view(torch.uint8)
    out[..., 2 * d:2 * d + 8] = torch.cat([ks, vs], -1).contiguous().view(torch.uint8)
    return out


def unpack_cells(cells: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page cells (..., cell_bytes) uint8 -> dequantized K, V float32 (..., D)."""
    scales = cells[..., 2 * d:2 * d + 8].contiguous().view(torch.float32)
    k = dequantize(cells[..., :d].contiguous().view(torch.int8), scales[..., :1])
    v = dequantize(cells[..., d:2 * d].contiguous().view(torch.int8), scales[..., 1:])
    return k, v


class Int8KVMethod(KVCacheMethod):
    def load_config(self, source: str | Path | Mapping[str, Any] | Int8KVConfig) -> Int8KVConfig:
        if isinstance(source, Int8KVConfig):
            return source
        if isinstance(source, Mapping):
            return Int8KVConfig.from_dict(source, source=f"{NAME} plan")
        return Int8KVConfig.load(source)

    def layer_formats(self, cfg: Int8KVConfig, model: ModelIdentity, *, tp_rank: int = 0,
                      tp_size: int = 1) -> list[LayerKVFormat]:
        if cfg.model:
            ModelIdentity.from_dict(cfg.model, source=f"{NAME} plan").check(model, source=f"{NAME} plan")
        _, heads = model.kv_heads_for_rank(tp_rank, tp_size, source=NAME)
        d = model.head_size
        return [LayerKVFormat(layer=i, num_kv_heads=heads, head_size=d, bits=8, group=d, sink=cfg.sink, window=0,
                              cell_bytes=cell_bytes(d)) for i in range(model.num_layers)]

    # -- paged engines -------------------------------------------------------------------------------
    def store(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, k: torch.Tensor,
              v: torch.Tensor) -> None:
        slots = batch.slot_mapping.to(torch.long)
        keep = slots >= 0
        n = slots.shape[0]
        slots, k, v = slots[keep], k[:n][keep], v[:n][keep]
        bs = pages.shape[2]
        pages[slots // bs, :, slots % bs] = pack_cells(k, v)

    def attend(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float, fp_pool: torch.Tensor | None = None) -> torch.Tensor:
        d, bs = fmt.head_size, pages.shape[2]
        rep = q.shape[1] // k.shape[1]
        qsl = batch.host_query_start_loc or batch.query_start_loc.tolist()
        prev = batch.host_prev_lens or batch.prev_lens.tolist()
        out = torch.empty_like(q)
        for r in range(len(qsl) - 1):
            a, b, lp = qsl[r], qsl[r + 1], prev[r]
            if b == a:
                continue
            pos = torch.arange(lp, device=q.device)
            blk = batch.block_table[r].to(torch.long)[pos // bs]
            kc, vc = unpack_cells(pages[blk, :, pos % bs], d)  # (lp, Hk, D)
            if fp_pool is not None and batch.fp_block_table is not None:  # sink (and window) at full precision
                use = pos >= int(batch.fp_from[r])
                if int(batch.sink_ok[r]):
                    use |= pos < fmt.sink
                slot = batch.fp_block_table[r].to(torch.long)[pos[use] // bs]
                fp = fp_pool[slot, :, pos[use] % bs].to(torch.float32)
                kc[use], vc[use] = fp[..., :d], fp[..., d:]
            kk = torch.cat([kc, k[a:b].float()]).repeat_interleave(rep, 1).transpose(0, 1)  # (Hq, lp + m, D)
            vv = torch.cat([vc, v[a:b].float()]).repeat_interleave(rep, 1).transpose(0, 1)
            m = b - a
            s = q[a:b].float().transpose(0, 1) @ kk.transpose(1, 2) * scale  # (Hq, m, lp + m)
            causal = torch.arange(lp + m, device=q.device)[None, :] <= (lp + torch.arange(m, device=q.device))[:, None]
            out[a:b] = (torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ vv).transpose(0, 1).to(q.dtype)
        return out

    # -- in-place compression (SGLang, transformers) -----------------------------------------------------
    def compress(self, fmt: LayerKVFormat, k: torch.Tensor, v: torch.Tensor) -> KVBody:
        return (*quantize(k), *quantize(v))

    def decompress(self, fmt: LayerKVFormat, body: KVBody, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        kq, ks, vq, vs = body
        return dequantize(kq, ks, dtype), dequantize(vq, vs, dtype)


METHOD = Int8KVMethod()

"""Per-head sparse-span attention (MoA-style sink + per-head recent window), contiguous and paged.

Semantics (the KV-cache contract's ``HeadSpans``; this module only takes the resulting window starts):
a query at position ``t`` reads, in KV head ``h``, the key positions ``p <= t`` with ``p < sink`` or
``p >= starts[query, h]``. Query heads map to KV heads in GQA groups (``q head // (Hq / Hk)``); the
softmax scale is given. Every query reads at least itself (``starts <= t``), so no row is empty.

Ops (each a Triton kernel for CUDA and a torch implementation, chosen per call by
:mod:`overdrive.kernels.dispatch`):

* :func:`span_prefill_attention` — fresh sequences laid out back to back (``cu_seqlens``), keys are the
  sequences' own tokens at positions ``0 .. len - 1``. The Triton kernel is a flash-attention loop per
  (query tile, query head) that visits only the key blocks holding the sink or the band
  ``[min start of the tile, last query]``: block-sparse per head. The torch version does the same per
  query chunk with SDPA over the key slice the chunk's heads need.
* :func:`span_paged_attention` — queries at any positions over a paged cache that already holds their
  keys (decode steps, chunked prefill). ``block_table[row, i]`` (or ``[row, head, i]`` for per-head
  pages) is the page of positions ``[i * bs, (i + 1) * bs)``; pages are ``(pages, heads, bs, D)`` views
  with any strides (last dim contiguous), head stride 0 when each page belongs to one head. The Triton
  kernel runs one program per (query, KV head) for the head's GQA group and walks only the sink and the
  head's window: per-head-length decode, bytes read = span, not length. The torch version gathers the
  same positions.
* :func:`span_attention_dense` — the dense masked definition (tests, small inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .dispatch import Op, register_op


def span_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, starts: torch.Tensor, sink: int) -> torch.Tensor:
    """Boolean (Hk, M, K): query m (at ``q_pos[m]``) of KV head h reads key position ``k_pos[k]``."""
    qp, kp = q_pos.to(torch.long)[None, :, None], k_pos.to(torch.long)[None, None, :]
    st = starts.to(torch.long).t()[:, :, None]
    return (kp >= 0) & (kp <= qp) & ((kp < sink) | (kp >= st))


def span_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                         k_pos: torch.Tensor, starts: torch.Tensor, sink: int, scale: float) -> torch.Tensor:
    """One sequence: q (M, Hq, D), k/v (K, Hk, D) at positions ``k_pos`` -> (M, Hq, D); float32 math
    (float64 inputs stay float64)."""
    hq, hk = q.shape[1], k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    allowed = span_allowed(q_pos, k_pos, starts, sink).repeat_interleave(hq // hk, 0)  # (Hq, M, K)
    kk = k.to(ct).transpose(0, 1).repeat_interleave(hq // hk, 0)
    vv = v.to(ct).transpose(0, 1).repeat_interleave(hq // hk, 0)
    s = (q.to(ct).transpose(0, 1) @ kk.transpose(1, 2)) * scale
    return (torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv).transpose(0, 1).to(q.dtype)


def _check(q: torch.Tensor, starts: torch.Tensor, hk: int, d: int, name: str) -> None:
    if q.dim() != 3 or q.shape[2] != d or q.shape[1] % hk:
        raise ValueError(f"{name}: q {tuple(q.shape)} must be (tokens, query heads, {d}) with query heads a multiple "
                         f"of the {hk} KV heads")
    if tuple(starts.shape) != (q.shape[0], hk):
        raise ValueError(f"{name}: starts {tuple(starts.shape)} must be (tokens, KV heads) = {(q.shape[0], hk)}")


def _host(x: torch.Tensor | Sequence[int]) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


# ----------------------------------------------------------------------------- contiguous prefill
def _prefill_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, starts: torch.Tensor, sink: int,
                   scale: float, chunk: int = 256) -> torch.Tensor:
    """Block-sparse in torch: per row, query chunk and KV head, SDPA over the sink and the key slice the
    chunk's window reaches (masked to the exact span)."""
    n, hq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    out = torch.empty_like(q)
    cu = _host(cu_seqlens)
    st_all = starts.to(torch.long)
    for r in range(len(cu) - 1):
        a, b = cu[r], cu[r + 1]
        for c0 in range(a, b, chunk):
            c1 = min(b, c0 + chunk)
            qpos = torch.arange(c0 - a, c1 - a, device=q.device)
            st = st_all[c0:c1]  # (m, Hk)
            for h in range(hk):
                lo = int(st[:, h].min())  # >= sink: the window never overlaps the sink
                kpos = torch.cat([torch.arange(min(sink, c1 - a), device=q.device),
                                  torch.arange(min(lo, c1 - a), c1 - a, device=q.device)])
                allowed = span_allowed(qpos, kpos, st[:, h:h + 1], sink)[0]  # (m, K)
                kk = k[a + kpos, h].to(q.dtype)
                vv = v[a + kpos, h].to(q.dtype)
                qq = q[c0:c1, h * g:(h + 1) * g].transpose(0, 1)  # (g, m, D)
                o = F.scaled_dot_product_attention(qq[None], kk[None, None].expand(1, g, -1, -1),
                                                   vv[None, None].expand(1, g, -1, -1), attn_mask=allowed[None, None],
                                                   scale=scale)[0]
                out[c0:c1, h * g:(h + 1) * g] = o.transpose(0, 1)
    return out


_PREFILL = register_op(Op("span_prefill_attention", _prefill_torch, "span_attention:span_prefill_attention",
                          "block-sparse causal attention with per-head sink + window spans (fresh sequences)"))


def span_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int],
                           starts: torch.Tensor, sink: int, scale: float) -> torch.Tensor:
    """Fresh sequences back to back: q (N, Hq, D), k/v (N, Hk, D), ``cu_seqlens`` (R + 1,) row offsets,
    ``starts`` (N, Hk) the window start of each token's query per KV head. Returns (N, Hq, D) in q's dtype."""
    n, hq, d = q.shape
    hk = k.shape[1]
    _check(q, starts, hk, d, "span_prefill_attention")
    if k.shape != (n, hk, d) or v.shape != k.shape:
        raise ValueError(f"span_prefill_attention: k {tuple(k.shape)} / v {tuple(v.shape)} must be ({n}, {hk}, {d})")
    cu = _host(cu_seqlens)
    if not cu or cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"span_prefill_attention: cu_seqlens must rise from 0 to {n} tokens, got {cu}")
    return _PREFILL(q, k, v, cu, starts, sink, scale, device=q.device)


# ----------------------------------------------------------------------------------------- paged
def _paged_torch(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                 q_row: torch.Tensor, q_pos: torch.Tensor, starts: torch.Tensor, sink: int, scale: float,
                 budget: int = 1 << 22) -> torch.Tensor:
    """Gathers, per query and KV head, only the positions the head reads (sink + window), in chunks of queries."""
    m, hq, d = q.shape
    hk = starts.shape[1]
    g = hq // hk
    bs = k_pages.shape[2]
    per_head = block_table.dim() == 3
    one_head_pages = k_pages.shape[1] == 1 and hk > 1
    out = torch.empty_like(q)
    pos_all, st_all = q_pos.to(torch.long), starts.to(torch.long)
    rows_all = q_row.to(torch.long)
    ns = min(sink, int(pos_all.max()) + 1) if m else 0
    width = int((pos_all[:, None] - st_all + 1).clamp_min(0).max()) if m else 0
    step = max(1, budget // max(1, hk * (ns + width) * d))
    hidx = torch.arange(hk, device=q.device)
    for c0 in range(0, m, step):
        c1 = min(m, c0 + step)
        pos, st, rows = pos_all[c0:c1, None], st_all[c0:c1], rows_all[c0:c1]
        # positions per (query, head): [0, ns) then [start, start + width), masked to the real span
        sk = torch.arange(ns, device=q.device)
        wk = st[:, :, None] + torch.arange(width, device=q.device)  # (c, Hk, W)
        kp = torch.cat([sk.expand(c1 - c0, hk, ns), wk], dim=2)  # (c, Hk, L)
        ok = (kp <= pos[:, :, None]) & ((kp < sink) | (kp >= st[:, :, None]))  # start >= sink: disjoint parts
        kpc = kp.clamp(min=0)
        blk_i = kpc // bs
        if per_head:
            blk_i = blk_i.clamp(max=block_table.shape[2] - 1)
            blk = block_table.to(torch.long)[rows[:, None, None], hidx[None, :, None], blk_i]
        else:
            blk_i = blk_i.clamp(max=block_table.shape[1] - 1)
            blk = block_table.to(torch.long)[rows[:, None, None], blk_i]
        if bool(((blk < 0) & ok).any()):
            raise ValueError("span_paged_attention: a position a head reads has no page (block table entry -1)")
        blk = blk.clamp(min=0)
        head = torch.zeros_like(blk) if one_head_pages else hidx[None, :, None].expand_as(blk)
        kk = k_pages[blk, head, kpc % bs].to(torch.float32)  # (c, Hk, L, D)
        vv = v_pages[blk, head, kpc % bs].to(torch.float32)
        qq = q[c0:c1].to(torch.float32).view(c1 - c0, hk, g, d)
        s = torch.einsum("chgd,chld->chgl", qq, kk) * scale
        s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
        o = torch.einsum("chgl,chld->chgd", torch.softmax(s, -1), vv)
        out[c0:c1] = o.reshape(c1 - c0, hq, d).to(q.dtype)
    return out


_PAGED = register_op(Op("span_paged_attention", _paged_torch, "span_attention:span_paged_attention",
                        "paged attention reading only each KV head's sink + window (decode, chunked prefill)"))


def span_paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                         q_row: torch.Tensor, q_pos: torch.Tensor, starts: torch.Tensor, sink: int,
                         scale: float) -> torch.Tensor:
    """Queries q (M, Hq, D) of rows ``q_row`` (M,) at positions ``q_pos`` (M,) over pages that hold every
    position they read. ``k_pages``/``v_pages``: (pages, Hk or 1, bs, D); ``block_table``: (rows, blocks)
    shared by the heads, or (rows, Hk, blocks) per head (then pages may have one head: a page belongs to
    one (row, head)). Entries of positions a head does not read may be -1. Returns (M, Hq, D)."""
    m, hq, d = q.shape
    hk = starts.shape[1] if starts.dim() == 2 else 0
    _check(q, starts, max(hk, 1), d, "span_paged_attention")
    if k_pages.dim() != 4 or v_pages.shape != k_pages.shape or k_pages.shape[3] != d:
        raise ValueError(f"span_paged_attention: pages {tuple(k_pages.shape)} / {tuple(v_pages.shape)} must be "
                         f"(pages, heads, block size, {d})")
    if k_pages.shape[1] not in (1, hk) or (k_pages.shape[1] == 1 and hk > 1 and block_table.dim() != 3):
        raise ValueError(f"span_paged_attention: pages hold {k_pages.shape[1]} heads for {hk} KV heads (one-head pages "
                         "need a per-head block table)")
    if block_table.dim() == 3 and block_table.shape[1] != hk:
        raise ValueError(f"span_paged_attention: per-head block table {tuple(block_table.shape)} must have {hk} heads")
    if q_row.shape != (m,) or q_pos.shape != (m,):
        raise ValueError(f"span_paged_attention: q_row {tuple(q_row.shape)} and q_pos {tuple(q_pos.shape)} must be ({m},)")
    return _PAGED(q, k_pages, v_pages, block_table, q_row, q_pos, starts, sink, scale, device=q.device)


def span_kv_bytes_read(q_pos: torch.Tensor, starts: torch.Tensor, sink: int, head_size: int, elem_bytes: int) -> int:
    """K and V bytes the paged span kernel reads for these queries: per KV head, ``min(sink, t + 1)`` sink
    positions and the window ``[start, t]``. Dense attention reads ``(t + 1) * Hk * 2 * D * elem`` per query."""
    pos = q_pos.to(torch.long)[:, None]
    st = starts.to(torch.long)
    read = torch.clamp(pos + 1, max=sink) + (pos + 1 - st).clamp_min(0)
    return int(read.sum()) * 2 * head_size * elem_bytes

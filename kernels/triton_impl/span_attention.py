"""Triton per-head sparse-span attention (semantics: ``overdrive/kernels/span_attention.py``).

* ``_span_prefill_kernel``: one program per (query tile, query head) of fresh sequences laid out back to
  back. A flash-attention loop over the key blocks of the sink, then over the band from the smallest
  window start of the tile (window starts only grow with the position) to the tile's last query: every
  other block is skipped, so a head's cost follows its span. Masks are exact per (query, key).
* ``_span_paged_kernel``: one program per (query, KV head), the head's GQA group of query heads
  together (padded to a 16-row dot tile); it walks the sink positions and then the window
  ``[start, position]`` through the block table in tiles of BLOCK_N positions (online softmax, ``tl.dot``),
  reading nothing outside the head's span.

Head sizes that are not powers of two are padded in registers (masked loads); fp32 inputs use IEEE
fp32 dots so the interpreter tests compare tightly with float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(s, v, acc, m_i, l_i, IEEE: tl.constexpr):
    """One online-softmax step: fold the (base-2 scaled) scores ``s`` of a key tile and its values ``v`` into
    the running (acc, max, sum); rows whose scores are all masked so far stay at zero."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _prefill_block(q, acc, m_i, l_i, k_ptr, v_ptr, row0, n0, hk, skt, skh, svt, svh, rm, rd, dm, m_ok, st, L, SINK,
                   qk_scale, IS_SINK: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < L
    kv_rows = (row0 + rn).to(tl.int64)
    k = tl.load(k_ptr + kv_rows[:, None] * skt + hk * skh + rd[None, :], mask=n_ok[:, None] & dm[None, :], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    causal = rn[None, :] <= rm[:, None]
    if IS_SINK:
        part = rn[None, :] < SINK
    else:
        part = rn[None, :] >= st[:, None]
    allowed = causal & part & n_ok[None, :] & m_ok[:, None]
    s = tl.where(allowed, s, float("-inf"))
    v = tl.load(v_ptr + kv_rows[:, None] * svt + hk * svh + rd[None, :], mask=n_ok[:, None] & dm[None, :], other=0.0)
    return _softmax_step(s, v, acc, m_i, l_i, IEEE)


@triton.jit
def _span_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, st_ptr, tile_row_ptr, tile_m0_ptr, cu_ptr,
                         sqt, sqh, skt, skh, svt, svh, sot, soh, sst, G, SINK, qk_scale,
                         D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    r = tl.load(tile_row_ptr + tile)
    m0 = tl.load(tile_m0_ptr + tile)  # first query position of the tile within its row
    row0 = tl.load(cu_ptr + r)
    L = tl.load(cu_ptr + r + 1) - row0
    rm = m0 + tl.arange(0, BM)
    m_ok = rm < L
    rd = tl.arange(0, DP)
    dm = rd < D
    tok = (row0 + rm).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * sqt + h * sqh + rd[None, :], mask=m_ok[:, None] & dm[None, :], other=0.0)
    st = tl.load(st_ptr + tok * sst + hk, mask=m_ok, other=2147483647)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DP), dtype=tl.float32)
    q_hi = tl.minimum(m0 + BM, L)  # one past the tile's last query
    sink_hi = tl.minimum(SINK, q_hi)
    for n0 in range(0, sink_hi, BN):
        acc, m_i, l_i = _prefill_block(q, acc, m_i, l_i, k_ptr, v_ptr, row0, n0, hk, skt, skh, svt, svh, rm, rd, dm,
                                       m_ok, st, L, SINK, qk_scale, True, BN, IEEE)
    lo = tl.min(tl.where(m_ok, st, 2147483647), axis=0)
    lo = (lo // BN) * BN
    for n0 in range(lo, q_hi, BN):
        acc, m_i, l_i = _prefill_block(q, acc, m_i, l_i, k_ptr, v_ptr, row0, n0, hk, skt, skh, svt, svh, rm, rd, dm,
                                       m_ok, st, L, SINK, qk_scale, False, BN, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + tok[:, None] * sot + h * soh + rd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & dm[None, :])


def span_prefill_attention(q, k, v, cu_seqlens, starts, sink, scale, tiles=None):
    n, hq, d = q.shape
    hk = k.shape[1]
    out = torch.empty_like(q)
    if n == 0:
        return out
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"span_prefill_attention (Triton): the last dimension of {name} must be contiguous")
    ieee = q.dtype == torch.float32
    bm, bn = (64, 64) if q.is_cuda and not ieee else (16, 16)
    if tiles is not None:
        bm, bn = tiles
    cu = [int(x) for x in cu_seqlens]
    rows, m0s = [], []
    for r in range(len(cu) - 1):
        for m0 in range(0, cu[r + 1] - cu[r], bm):
            rows.append(r)
            m0s.append(m0)
    dev = q.device
    tile_row = torch.tensor(rows, dtype=torch.int32, device=dev)
    tile_m0 = torch.tensor(m0s, dtype=torch.int32, device=dev)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    st = starts.to(device=dev, dtype=torch.int32).contiguous()
    dp = max(16, triton.next_power_of_2(d))
    _span_prefill_kernel[(len(rows), hq)](
        q, k, v, out, st, tile_row, tile_m0, cu_t,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        st.stride(0), hq // hk, int(sink), float(scale) * LOG2E,
        D=d, DP=dp, BM=bm, BN=bn, IEEE=ieee)
    return out


@triton.jit
def _paged_tile(q, acc, m_i, l_i, kp_ptr, vp_ptr, bt_ptr, r, hk, p, p_ok, c, cm, sbt_r, sbt_h, skp_b, skp_h, skp_t,
                svp_b, svp_h, svp_t, BS, qk_scale, IEEE: tl.constexpr):
    bidx = p // BS
    off = p % BS
    blk = tl.load(bt_ptr + r * sbt_r + hk * sbt_h + bidx, mask=p_ok, other=0).to(tl.int64)
    p_ok = p_ok & (blk >= 0)
    blk = tl.maximum(blk, 0)
    m2 = p_ok[:, None] & cm[None, :]
    k = tl.load(kp_ptr + (blk * skp_b + hk * skp_h + off * skp_t)[:, None] + c[None, :], mask=m2, other=0.0)
    v = tl.load(vp_ptr + (blk * svp_b + hk * svp_h + off * svp_t)[:, None] + c[None, :], mask=m2, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale  # (GP, N)
    s = tl.where(p_ok[None, :], s, float("-inf"))
    return _softmax_step(s, v, acc, m_i, l_i, IEEE)


@triton.jit
def _span_paged_kernel(q_ptr, kp_ptr, vp_ptr, bt_ptr, row_ptr, pos_ptr, st_ptr, o_ptr,
                       sq_m, sq_h, so_m, so_h, sst, sbt_r, sbt_h, skp_b, skp_h, skp_t, svp_b, svp_h, svp_t,
                       BS, SINK, qk_scale,
                       D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr,
                       IEEE: tl.constexpr):
    m = tl.program_id(0)
    hk = tl.program_id(1)
    c = tl.arange(0, DP)
    cm = c < D
    gq = tl.arange(0, GP)  # the KV head's query heads, padded to a dot tile (>= 16 rows)
    gm = gq < G
    qh = hk * G + gq
    q = tl.load(q_ptr + m * sq_m + qh[:, None] * sq_h + c[None, :], mask=gm[:, None] & cm[None, :], other=0.0)
    r = tl.load(row_ptr + m).to(tl.int64)
    pos = tl.load(pos_ptr + m)
    st = tl.load(st_ptr + m * sst + hk)
    m_i = tl.full((GP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, DP), dtype=tl.float32)
    sink_hi = tl.minimum(SINK, pos + 1)
    for t0 in range(0, sink_hi, BLOCK_N):
        p = t0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _paged_tile(q, acc, m_i, l_i, kp_ptr, vp_ptr, bt_ptr, r, hk, p, p < sink_hi, c, cm, sbt_r,
                                    sbt_h, skp_b, skp_h, skp_t, svp_b, svp_h, svp_t, BS, qk_scale, IEEE)
    for t0 in range(st, pos + 1, BLOCK_N):
        p = t0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _paged_tile(q, acc, m_i, l_i, kp_ptr, vp_ptr, bt_ptr, r, hk, p, p <= pos, c, cm, sbt_r,
                                    sbt_h, skp_b, skp_h, skp_t, svp_b, svp_h, svp_t, BS, qk_scale, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + m * so_m + qh[:, None] * so_h + c[None, :], out.to(o_ptr.dtype.element_ty),
             mask=gm[:, None] & cm[None, :])


def span_paged_attention(q, k_pages, v_pages, block_table, q_row, q_pos, starts, sink, scale, block_n=None):
    m, hq, d = q.shape
    hk = starts.shape[1]
    out = torch.empty_like(q)
    if m == 0:
        return out
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if t.stride(-1) != 1:
            raise ValueError(f"span_paged_attention (Triton): the last dimension of {name} must be contiguous")
    dev = q.device
    bt = block_table.to(device=dev, dtype=torch.int32)
    sbt_h = bt.stride(1) if bt.dim() == 3 else 0
    one_head = k_pages.shape[1] == 1 and hk > 1
    st = starts.to(device=dev, dtype=torch.int32).contiguous()
    g = hq // hk
    _span_paged_kernel[(m, hk)](
        q, k_pages, v_pages, bt, q_row.to(device=dev, dtype=torch.int32).contiguous(),
        q_pos.to(device=dev, dtype=torch.int32).contiguous(), st, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), st.stride(0), bt.stride(0), sbt_h,
        k_pages.stride(0), 0 if one_head else k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), 0 if one_head else v_pages.stride(1), v_pages.stride(2),
        k_pages.shape[2], int(sink), float(scale) * LOG2E,
        D=d, DP=max(16, triton.next_power_of_2(d)), G=g, GP=max(16, triton.next_power_of_2(g)),
        BLOCK_N=block_n or (64 if q.is_cuda else 16), IEEE=q.dtype == torch.float32)
    return out

"""Triton decode attention over PM-KVQ page cells: dequantization fused into the attention loop.

One program per (row, KV head) handles the row's GQA group of query heads. It walks the row's cached
positions in tiles of BLOCK_N tokens: it looks up each token's block in the block table, loads the
K/V code words and float32 scale/zero of its cell, unpacks and dequantizes in registers (positions
of the full-precision sink/window come from the full-precision store instead), and folds the tile
into an online softmax. The row's new token is the first element of that softmax. Layout and
semantics: ``overdrive/kernels/kv_attention.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packing import packed_length


@triton.jit
def _kv_decode_kernel(q_ptr, kn_ptr, vn_ptr, pages_ptr, bt_ptr, plen_ptr, out_ptr,
                      fp_ptr, fbt_ptr, ffrom_ptr, sok_ptr,
                      sq_r, sq_h, skn_r, skn_h, svn_r, svn_h, so_r, so_h,
                      sp_b, sp_h, sp_t, sbt_r, sfp_s, sfp_h, sfp_t, sfbt_r,
                      scale, BS,
                      D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                      BITS: tl.constexpr, GROUP: tl.constexpr, SINK: tl.constexpr, HAS_FP: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    CPW: tl.constexpr = 32 // BITS
    WB: tl.constexpr = D // CPW
    NG: tl.constexpr = D // GROUP
    MASK: tl.constexpr = (1 << BITS) - 1

    c = tl.arange(0, DP)
    cm = c < D
    gq = tl.arange(0, GP)
    gm = gq < G
    qrow = h * G + gq
    q = tl.load(q_ptr + r * sq_r + qrow[:, None] * sq_h + c[None, :], mask=gm[:, None] & cm[None, :],
                other=0.0).to(tl.float32)
    kn = tl.load(kn_ptr + r * skn_r + h * skn_h + c, mask=cm, other=0.0).to(tl.float32)
    vn = tl.load(vn_ptr + r * svn_r + h * svn_h + c, mask=cm, other=0.0).to(tl.float32)

    # the new token starts the online softmax
    m_i = tl.sum(q * kn[None, :], axis=1) * scale  # (GP,)
    l_i = tl.full((GP,), 1.0, tl.float32)
    acc = tl.zeros((GP, DP), tl.float32) + vn[None, :]

    word = c // CPW
    shift = ((c % CPW) * BITS).to(tl.uint32)
    grp = c // GROUP
    lp = tl.load(plen_ptr + r)
    if HAS_FP:
        ffrom = tl.load(ffrom_ptr + r)
        sok = tl.load(sok_ptr + r)
    for t0 in range(0, lp, BLOCK_N):
        p = t0 + tl.arange(0, BLOCK_N)
        pm = p < lp
        bidx = p // BS
        off = p % BS
        blk = tl.load(bt_ptr + r * sbt_r + bidx, mask=pm, other=0).to(tl.int64)
        base = blk * sp_b + h * sp_h + off * sp_t  # (N,) word offset of each token's cell
        m2 = pm[:, None] & cm[None, :]
        kw = tl.load(pages_ptr + base[:, None] + word[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
        vw = tl.load(pages_ptr + base[:, None] + WB + word[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
        mb = base[:, None] + 2 * WB + grp[None, :]
        ks = tl.load(pages_ptr + mb, mask=m2, other=0).to(tl.float32, bitcast=True)
        kz = tl.load(pages_ptr + mb + NG, mask=m2, other=0).to(tl.float32, bitcast=True)
        vs = tl.load(pages_ptr + mb + 2 * NG, mask=m2, other=0).to(tl.float32, bitcast=True)
        vz = tl.load(pages_ptr + mb + 3 * NG, mask=m2, other=0).to(tl.float32, bitcast=True)
        k = ((kw >> shift[None, :]) & MASK).to(tl.float32) * ks + kz
        v = ((vw >> shift[None, :]) & MASK).to(tl.float32) * vs + vz
        if HAS_FP:
            use = pm & ((p >= ffrom) | ((p < SINK) & (sok != 0)))
            slot = tl.load(fbt_ptr + r * sfbt_r + bidx, mask=use, other=0).to(tl.int64)
            fb = slot * sfp_s + h * sfp_h + off * sfp_t
            u2 = use[:, None] & cm[None, :]
            kf = tl.load(fp_ptr + fb[:, None] + c[None, :], mask=u2, other=0.0).to(tl.float32)
            vf = tl.load(fp_ptr + fb[:, None] + D + c[None, :], mask=u2, other=0.0).to(tl.float32)
            k = tl.where(use[:, None], kf, k)
            v = tl.where(use[:, None], vf, v)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (GP, N)
        s = tl.where(pm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        pe = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pe, axis=1)
        acc = acc * alpha[:, None] + tl.sum(pe[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + r * so_r + qrow[:, None] * so_h + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gm[:, None] & cm[None, :])


def kv_decode_attention(q, k_new, v_new, pages, block_table, prev_lens, bits, group, scale, fp_pool=None,
                        fp_block_table=None, fp_from=None, sink=0, sink_ok=None):
    r, hq, d = q.shape
    hk = k_new.shape[1]
    if pages.stride(-1) != 1 or q.stride(-1) != 1 or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("kv_decode_attention (Triton): the last dimension of pages, q, k_new and v_new must be "
                         "contiguous")
    if packed_length(d, bits) * (32 // bits) != d:
        raise ValueError(f"kv_decode_attention (Triton): head size {d} does not fill whole {bits}-bit words")
    out = torch.empty_like(q)
    if r == 0:
        return out
    has_fp = fp_pool is not None
    dev = q.device
    if not has_fp:
        fp_pool = torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=dev)
        fp_block_table = torch.full((1, 1), -1, dtype=torch.int32, device=dev)
    if fp_from is None:
        fp_from = prev_lens
    if sink_ok is None:
        sink_ok = torch.zeros(r, dtype=torch.int32, device=dev)
    g = hq // hk
    _kv_decode_kernel[(r, hk)](
        q, k_new, v_new, pages, block_table, prev_lens.to(torch.int32), out,
        fp_pool, fp_block_table, fp_from.to(torch.int32), sink_ok.to(torch.int32),
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        out.stride(0), out.stride(1),
        pages.stride(0), pages.stride(1), pages.stride(2), block_table.stride(0),
        fp_pool.stride(0), fp_pool.stride(1), fp_pool.stride(2), fp_block_table.stride(0),
        float(scale), pages.shape[2],
        D=d, DP=triton.next_power_of_2(d), G=g, GP=triton.next_power_of_2(g), BITS=bits, GROUP=group,
        SINK=int(sink), HAS_FP=has_fp, BLOCK_N=16)
    return out

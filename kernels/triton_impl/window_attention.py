"""Triton head-wise band/arrow attention: flash-attention over the key blocks the mask touches.

One program per (query block, batch x head). The key loop visits only the blocks that can hold an
allowed pair: the band ``[q_lo - w, q_hi + w]`` (every key block when the query block holds a text
row), then the text key blocks outside that range. Operands stay in their dtype (bf16/fp16 on the
tensor cores, fp32 accumulation); fp32 inputs use IEEE fp32 dots (exact-reference tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend(q, acc, m_i, l_i, k_ptr, v_ptr, base, n0, rm, rd, m_ok, row_text, w, S, t0, t1, qk_scale,
            D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < S
    k = tl.load(k_ptr + base + rn[:, None] * D + rd[None, :], mask=n_ok[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    diff = rm[:, None] - rn[None, :]
    allowed = (tl.abs(diff) <= w) | row_text[:, None] | ((rn >= t0) & (rn < t1))[None, :]
    allowed = allowed & n_ok[None, :] & m_ok[:, None]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + base + rn[:, None] * D + rd[None, :], mask=n_ok[:, None], other=0.0)
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _window_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, w_ptr, S, H, qk_scale, t0, t1,
                        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    base = bh.to(tl.int64) * S * D
    w = tl.load(w_ptr + h)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, D)
    m_ok = rm < S
    q = tl.load(q_ptr + base + rm[:, None] * D + rd[None, :], mask=m_ok[:, None], other=0.0)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    q_lo = pid_m * BM
    q_hi = tl.minimum(q_lo + BM, S) - 1
    row_text = (rm >= t0) & (rm < t1)
    q_text = (q_lo < t1) & (q_hi >= t0)  # a text row in this block sees every key
    lo = tl.where(q_text, 0, tl.maximum(q_lo - w, 0))
    hi = tl.where(q_text, S, tl.minimum(q_hi + w + 1, S))
    lo = (lo // BN) * BN
    for n0 in range(lo, hi, BN):
        acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_ptr, v_ptr, base, n0, rm, rd, m_ok, row_text, w, S, t0, t1,
                                qk_scale, D, BN, IEEE)
    # text key blocks the band loop did not visit (block-aligned, so no block is visited twice)
    for n0 in range((t0 // BN) * BN, t1, BN):
        if (n0 + BN <= lo) | (n0 >= hi):
            acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_ptr, v_ptr, base, n0, rm, rd, m_ok, row_text, w, S, t0, t1,
                                    qk_scale, D, BN, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + base + rm[:, None] * D + rd[None, :], out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor,
                     text_start: int = 0, text_end: int = 0, scale: float | None = None,
                     out: torch.Tensor | None = None, tiles: tuple[int, int] | None = None) -> torch.Tensor:
    """``tiles=(BM, BN)`` overrides the tile choice (tests run the GPU tiling in the interpreter)."""
    b, h, s, d = q.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"window_attention (Triton): head size {d} must be a power of two >= 16")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(qc) if out is None else out
    ieee = q.dtype == torch.float32
    if q.is_cuda and not ieee:
        bm, bn, warps, stages = 128, 64, (8 if d >= 128 else 4), 3
    else:  # fp32 / interpreter: small tiles (registers; interpreter time follows the masked work)
        bm, bn, warps, stages = 32, 32, 4, 2
    if tiles is not None:
        bm, bn = tiles
    _window_attn_kernel[(triton.cdiv(s, bm), b * h)](qc, kc, vc, o, window.to(q.device, torch.int32).contiguous(), s, h,
                                                     scale * LOG2E, text_start, text_end, D=d, BM=bm, BN=bn, IEEE=ieee,
                                                     num_warps=warps, num_stages=stages)
    return o

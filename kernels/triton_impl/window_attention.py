"""Triton head-wise band/arrow attention: flash-attention over the key blocks the mask touches."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _window_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, w_ptr, S, H, scale, t0, t1,
                        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    base = bh * S * D
    w = tl.load(w_ptr + h)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, D)
    m_ok = rm < S
    q = tl.load(q_ptr + base + rm[:, None] * D + rd[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    q_lo = pid_m * BM
    q_hi = tl.minimum(q_lo + BM, S) - 1
    q_text = (q_lo < t1) & (q_hi >= t0)  # some query row of this block is a text row: it sees every key
    for n0 in range(0, S, BN):
        n_hi = n0 + BN - 1
        in_band = (n0 <= q_hi + w) & (n_hi >= q_lo - w)
        k_text = (n0 < t1) & (n_hi >= t0)
        if in_band | k_text | q_text:
            rn = n0 + tl.arange(0, BN)
            n_ok = rn < S
            k = tl.load(k_ptr + base + rn[:, None] * D + rd[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            diff = rm[:, None] - rn[None, :]
            allowed = (tl.abs(diff) <= w) | ((rm >= t0) & (rm < t1))[:, None] | ((rn >= t0) & (rn < t1))[None, :]
            allowed = allowed & n_ok[None, :] & m_ok[:, None]
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + base + rn[:, None] * D + rd[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + base + rm[:, None] * D + rd[None, :], out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor,
                     text_start: int = 0, text_end: int = 0, scale: float | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    b, h, s, d = q.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"window_attention (Triton): head size {d} must be a power of two >= 16")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(qc) if out is None else out
    bm = bn = 32
    _window_attn_kernel[(triton.cdiv(s, bm), b * h)](qc, kc, vc, o, window.to(torch.int32).contiguous(), s, h, scale,
                                                     text_start, text_end, D=d, BM=bm, BN=bn)
    return o

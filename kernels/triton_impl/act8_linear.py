"""Triton W8A8/W4A8 GEMM: per-token int8 activation quantization fused into the int8 GEMM."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import as_2d_with_output


@triton.jit
def _act8_kernel(x_ptr, q_ptr, ws_ptr, b_ptr, s_ptr, y_ptr, M, N, K, n_words, sxm, sxk, sym, syn,
                 WBITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    # pass 1: per-token absolute maximum over K (the activation scale)
    amax = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & (kk[None, :] < K),
                    other=0.0).to(tl.float32)
        if HAS_SMOOTH:  # channel balancing: x / smooth[k] (masked channels divide 0 by 1)
            sm = tl.load(s_ptr + kk, mask=kk < K, other=1.0).to(tl.float32)
            x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], x.shape))
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    # IEEE-rounded fp32 divisions (div_rn), as torch computes them: GPU `/` is approximate and would
    # move rounding ties of the activation codes
    sx = tl.math.div_rn(tl.maximum(amax, 1e-12), tl.full(amax.shape, 127.0, tl.float32))
    # pass 2: quantize x tiles on the fly, int8 x int8 -> int32
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(s_ptr + kk, mask=k_ok, other=1.0).to(tl.float32)
            x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], x.shape))
        v = tl.math.div_rn(x, tl.broadcast_to(sx[:, None], x.shape))
        v = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
        xq = tl.minimum(tl.maximum(v, -127.0), 127.0).to(tl.int8)
        mask2 = k_ok[:, None] & n_ok[None, :]
        if WBITS == 8:
            w = tl.load(q_ptr + rn[None, :] * K + kk[:, None], mask=mask2, other=0)
        else:
            word = tl.load(q_ptr + rn[None, :] * n_words + (kk // 8)[:, None], mask=mask2, other=0)
            code = (word.to(tl.uint32, bitcast=True) >> ((kk % 8) * 4).to(tl.uint32)[:, None]) & 15
            w = tl.where(mask2, code.to(tl.int32) - 8, 0).to(tl.int8)
        acc += tl.dot(xq, w)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def act8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, wbits: int,
                bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                smooth: torch.Tensor | None = None) -> torch.Tensor:
    N = qweight.shape[0]
    x2, y = as_2d_with_output(x, N, out)
    M, K = x2.shape
    if M and N:
        q = qweight.contiguous()
        bm = 16 if M <= 16 else 64
        grid = (triton.cdiv(M, bm), triton.cdiv(N, 64))
        _act8_kernel[grid](x2, q, w_scales, bias if bias is not None else w_scales,
                           smooth.contiguous() if smooth is not None else w_scales, y, M, N, K, q.shape[1],
                           x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
                           WBITS=wbits, HAS_BIAS=bias is not None, HAS_SMOOTH=smooth is not None, BM=bm, BN=64, BK=64)
    return y.reshape(*x.shape[:-1], N)

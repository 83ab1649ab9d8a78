"""Triton fused unpack + dequantize + GEMM/GEMV for 3/4-bit group-asymmetric weights."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import as_2d_with_output


@triton.jit
def _group_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, n_words, n_groups,
                         sxm, sxk, sym, syn,
                         BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        # codes of W^T tile (BK, BN): code k of row n lives in the packing group k // G at bit BITS*(k % G)
        pos = BITS * (kk % G)
        word = (kk // G) * W + pos // 32
        sh = (pos % 32).to(tl.uint32)
        mask2 = k_ok[:, None] & n_ok[None, :]
        base = q_ptr + rn[None, :] * n_words
        lo = tl.load(base + word[:, None], mask=mask2, other=0).to(tl.uint32, bitcast=True)
        straddle = (pos % 32 + BITS) > 32
        hi = tl.load(base + word[:, None] + 1, mask=mask2 & straddle[:, None], other=0).to(tl.uint32, bitcast=True)
        v = lo >> sh[:, None]
        v = tl.where(straddle[:, None], v | (hi << (32 - sh)[:, None]), v)
        code = (v & ((1 << BITS) - 1)).to(tl.float32)
        g = kk // GROUP
        sz_off = rn[None, :] * n_groups + g[:, None]
        s = tl.load(s_ptr + sz_off, mask=mask2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=mask2, other=0).to(tl.float32)
        w = ((code - z) * s).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & n_ok[None, :])


def group_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group_size: int, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    lcm = math.lcm(bits, 32)
    g, w = lcm // bits, lcm // 32
    N = qweight.shape[0]
    x2, y = as_2d_with_output(x, N, out)
    M, K = x2.shape
    if M and N:
        q, s, z = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
        bm = 16 if M <= 16 else 64  # decode (GEMV-like) tile vs prefill tile
        bn, bk = 64, 64
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _group_linear_kernel[grid](x2, q, s, z, bias if bias is not None else s, y, M, N, K, q.shape[1], s.shape[1],
                                   x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
                                   BITS=bits, G=g, W=w, GROUP=group_size, HAS_BIAS=bias is not None,
                                   BM=bm, BN=bn, BK=bk)
    return y.reshape(*x.shape[:-1], N)

"""Triton int8 weight-only linear: y = x @ (qweight * scale).T + bias, fp32 accumulation."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import as_2d_with_output


@triton.jit
def _int8_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                        sxm, sxk, swn, swk, sym, syn,
                        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        # int8 codes are exact in fp16/bf16/fp32: dequantize the tile to x's dtype, accumulate in fp32
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    N = qweight.shape[0]
    x2, y = as_2d_with_output(x, N, out)
    M, K = x2.shape
    if M and N:
        bm = 16 if M <= 16 else 64  # decode (M <= 16) uses a thin tile
        bn, bk = 64, 64
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _int8_linear_kernel[grid](x2, qweight, scale, bias if bias is not None else scale, y, M, N, K,
                                  x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
                                  y.stride(0), y.stride(1),
                                  HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk)
    return y.reshape(*x.shape[:-1], N)

"""Triton vector-quantized linear (see overdrive.kernels.vq_linear): one program per (row of x, tile of
BN outputs); per step a (BN, BV) tile of codes, the (BN, BV, 8) gathered codewords, reduced against
the (BV, 8) slice of x, in float32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _vq_kernel(x_ptr, dir_ptr, mag_ptr, s_ptr, cb_ptr, lv_ptr, y_ptr, N, V,
               BN: tl.constexpr, BV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    re = tl.arange(0, 8)
    n_ok = rn < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        v_ok = rv < V
        ok = n_ok[:, None] & v_ok[None, :]
        d = tl.load(dir_ptr + rn[:, None] * V + rv[None, :], mask=ok, other=0)
        mg = tl.load(mag_ptr + rn[:, None] * V + rv[None, :], mask=ok, other=0)
        lv = tl.load(lv_ptr + mg, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + pid_m * V * 8 + rv[:, None] * 8 + re[None, :], mask=v_ok[:, None], other=0.0)
        c = tl.load(cb_ptr + d[:, :, None] * 8 + re[None, None, :], mask=ok[:, :, None], other=0.0)
        dot = tl.sum(c.to(tl.float32) * x.to(tl.float32)[None, :, :], axis=2)
        acc += tl.sum(dot * lv, axis=1)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m * N + rn, (acc * s).to(y_ptr.dtype.element_ty), mask=n_ok)


def vq_linear(x: torch.Tensor, dir_codes: torch.Tensor, mag_codes: torch.Tensor, scales: torch.Tensor,
              codebook: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    m = x.shape[0]
    n, v = dir_codes.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bn, bv = 32, 16
    grid = (m, triton.cdiv(n, bn))
    _vq_kernel[grid](x.contiguous(), dir_codes.to(torch.int32).contiguous(), mag_codes.to(torch.int32).contiguous(),
                     scales.contiguous(), codebook.to(torch.float32).contiguous(), levels.to(torch.float32).contiguous(),
                     y, n, v, BN=bn, BV=bv)
    return y

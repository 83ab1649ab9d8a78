"""Triton Hadamard transform of contiguous power-of-two blocks: ``y = x @ H_p / sqrt(p)`` per block.

The (R, p) rows are multiplied by ``H_p`` as a tiled GEMM whose Hadamard tiles are generated in
registers (``H[k, n] = (-1)^popcount(k & n)``), so nothing but ``x`` is read: O(p) work per element,
on tensor cores. Blocks smaller than 16 (below ``tl.dot``'s minimum) use the torch reference.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, R, P: tl.constexpr, LOG2P: tl.constexpr, scale,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < R
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, P, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * P + kk[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        v = kk[:, None] & rn[None, :]
        parity = tl.zeros((BK, BN), dtype=tl.int32)
        for b in tl.static_range(LOG2P):
            parity = parity ^ ((v >> b) & 1)
        h = (1 - 2 * parity).to(tl.float32)
        if IEEE:
            acc += tl.dot(x, h, input_precision="ieee")
        else:
            acc += tl.dot(x, h)
    y = acc * scale
    tl.store(y_ptr + rm[:, None] * P + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])


def hadamard_blocks(x: torch.Tensor, p: int) -> torch.Tensor:
    if p < 16:
        from ..hadamard import _blocks_reference

        return _blocks_reference(x, p)
    xc = x.contiguous()
    r = xc.numel() // p
    y = torch.empty_like(xc)
    bn = min(64, p)
    bk = min(32, p)
    bm = 32
    grid = (triton.cdiv(r, bm), triton.cdiv(p, bn))
    _hadamard_kernel[grid](xc, y, r, p, int(math.log2(p)), 1.0 / math.sqrt(p), BM=bm, BN=bn, BK=bk,
                           IEEE=x.dtype == torch.float32)
    return y.reshape(x.shape)

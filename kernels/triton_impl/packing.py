"""Triton unpack of low-bit codes (layout: overdrive.kernels.packing)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _unpack_kernel(p_ptr, out_ptr, rows, n, words_per_row,
                   BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < n
    grp = c // G
    i = c % G
    pos = BITS * i
    j = pos // 32
    sh = pos % 32
    base = p_ptr + row * words_per_row + grp * W
    lo = tl.load(base + j, mask=ok, other=0).to(tl.uint32, bitcast=True)
    straddle = ok & (sh + BITS > 32)
    hi = tl.load(base + j + 1, mask=straddle, other=0).to(tl.uint32, bitcast=True)
    v = lo >> sh.to(tl.uint32)
    hi_part = hi << (32 - sh).to(tl.uint32)
    v = tl.where(straddle, v | hi_part, v)
    code = v & ((1 << BITS) - 1)
    tl.store(out_ptr + row * n + c, code.to(out_ptr.dtype.element_ty), mask=ok)


def unpack(packed: torch.Tensor, bits: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    lcm = math.lcm(bits, 32)
    g, w = lcm // bits, lcm // 32
    lead = packed.shape[:-1]
    p = packed.reshape(-1, packed.shape[-1]).contiguous()
    rows = p.shape[0]
    dtype = torch.uint8 if bits <= 8 else torch.int32
    out = torch.empty(rows, n, dtype=dtype, device=packed.device) if out is None else out.view(rows, n)
    if rows and n:
        block = 256
        _unpack_kernel[(rows, triton.cdiv(n, block))](p, out, rows, n, p.shape[1],
                                                       BITS=bits, G=g, W=w, BLOCK=block)
    return out.reshape(*lead, n)

"""Triton PM-KVQ quantize (x -> packed codes, scale, zero) and b -> b/2 integer requantization."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packing import packed_length


@triton.jit
def _kv_quant_kernel(x_ptr, p_ptr, s_ptr, z_ptr, D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr):
    row = tl.program_id(0)   # one token
    grp = tl.program_id(1)   # one channel group
    CPW: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = GROUP // CPW
    c = tl.arange(0, GROUP)
    x = tl.load(x_ptr + row * D + grp * GROUP + c).to(tl.float32)
    lo = tl.min(x, axis=0)
    hi = tl.max(x, axis=0)
    # IEEE-rounded divisions (div_rn): GPU `/` on fp32 is approximate and moves rounding ties
    scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(hi.shape, (1 << BITS) - 1, tl.float32)), 1e-8)
    code = tl.floor(tl.math.div_rn(x - lo, scale) + 0.5)
    code = tl.minimum(tl.maximum(code, 0.0), (1 << BITS) - 1).to(tl.uint32)
    code2 = tl.reshape(code, (WORDS, CPW))
    shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
    words = tl.sum(code2 << shifts[None, :], axis=1)  # disjoint bit fields: the sum is the OR
    n_groups: tl.constexpr = D // GROUP
    tl.store(p_ptr + row * (D // CPW) + grp * WORDS + tl.arange(0, WORDS), words.to(tl.int32, bitcast=True))
    tl.store(s_ptr + row * n_groups + grp, scale)
    tl.store(z_ptr + row * n_groups + grp, lo)


@triton.jit
def _kv_requant_kernel(p_ptr, o_ptr, n_words_in, BITS: tl.constexpr, BLOCK: tl.constexpr):
    # each output word packs the codes of two input words (twice as many codes per word at half the bits)
    row = tl.program_id(0)
    HALF: tl.constexpr = BITS // 2
    CPW_IN: tl.constexpr = 32 // BITS
    F: tl.constexpr = (1 << HALF) + 1
    ow = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_out = n_words_in // 2
    ok = ow < n_out
    acc = tl.zeros((BLOCK,), dtype=tl.uint32)
    for half_idx in tl.static_range(2):
        w = tl.load(p_ptr + row * n_words_in + ow * 2 + half_idx, mask=ok, other=0).to(tl.uint32, bitcast=True)
        for i in tl.static_range(CPW_IN):
            code = (w >> (i * BITS)) & ((1 << BITS) - 1)
            new = (2 * code + F) // (2 * F)
            acc = acc | (new << ((half_idx * CPW_IN + i) * HALF))
    tl.store(o_ptr + row * n_out + ow, acc.to(tl.int32, bitcast=True), mask=ok)


def kv_quantize(x: torch.Tensor, bits: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if group & (group - 1) or group < 32 // bits * 1 or group % (32 // bits):
        raise ValueError(f"kv_quantize (Triton): group {group} must be a power of two holding whole words")
    x2 = x.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    packed = torch.empty(rows, packed_length(d, bits), dtype=torch.int32, device=x.device)
    scale = torch.empty(rows, d // group, dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    if rows:
        _kv_quant_kernel[(rows, d // group)](x2, packed, scale, zero, D=d, GROUP=group, BITS=bits)
    lead = x.shape[:-1]
    return packed.reshape(*lead, -1), scale.reshape(*lead, -1), zero.reshape(*lead, -1)


def kv_requantize(packed: torch.Tensor, scale: torch.Tensor, bits: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = bits // 2
    p2 = packed.reshape(-1, packed.shape[-1]).contiguous()
    rows, n_in = p2.shape
    out = torch.empty(rows, packed_length(d, half), dtype=torch.int32, device=packed.device)
    if rows and out.shape[1]:
        block = 64
        _kv_requant_kernel[(rows, triton.cdiv(out.shape[1], block))](p2, out, n_in, BITS=bits, BLOCK=block)
    return out.reshape(*packed.shape[:-1], -1), scale * ((1 << half) + 1)

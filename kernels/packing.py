"""Low-bit integer packing shared by every method: unsigned codes of ``bits`` bits -> int32 words.

Layout (the checkpoint-format docs quote this section; keep them in sync):

* Codes are unsigned integers in ``[0, 2**bits)``, packed along the **last** dimension.
* Codes are taken in groups of ``G = lcm(bits, 32) / bits`` codes that fill ``W = lcm(bits, 32) / 32``
  int32 words exactly: 2-bit: 16 codes -> 1 word; 3-bit: 32 codes -> 3 words; 4-bit: 8 codes -> 1 word;
  8-bit: 4 codes -> 1 word; 16-bit: 2 codes -> 1 word (1-bit: 32 codes -> 1 word).
* Within a group, the W words are one little-endian ``32*W``-bit integer (word 0 holds bits 0..31),
  and code ``i`` of the group occupies bits ``[bits*i, bits*(i+1))`` of it. A 3-bit code therefore
  straddles two words when ``bits*i mod 32 > 29``: codes 10 (bits 30..32) and 21 (bits 63..65).
* Words are stored as int32 (two's complement of the unsigned 32-bit word).
* If the last dimension is not a multiple of G it is zero-padded to one; :func:`unpack` takes the
  original length and drops the padding.

Example (3-bit): codes ``[7, 0, 5, 0, ..., 0]`` pack to words ``[7 | 5 << 6, 0, 0] = [327, 0, 0]``.
"""
from __future__ import annotations

import math

import torch

from .dispatch import Op, register_op

SUPPORTED_BITS = (1, 2, 3, 4, 8, 16)


def group_shape(bits: int) -> tuple[int, int]:
    """(codes per group, int32 words per group) for ``bits``."""
    _check_bits(bits)
    lcm = math.lcm(bits, 32)
    return lcm // bits, lcm // 32


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes."""
    g, w = group_shape(bits)
    return -(-n // g) * w


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def pack_reference(codes: torch.Tensor, bits: int, name: str = "codes") -> torch.Tensor:
    """Torch reference of :func:`pack`. ``codes`` (..., n) integer tensor -> (..., packed_length) int32."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"{name} has values outside [0, {1 << bits}) for bits={bits} "
                         f"(min {int(c.min())}, max {int(c.max())})")
    g, w = group_shape(bits)
    n = c.shape[-1]
    pad = (-n) % g
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, g)
    words = torch.zeros(*c.shape[:-1], w, dtype=torch.int64, device=c.device)
    for i in range(g):
        pos = bits * i
        j, sh = divmod(pos, 32)
        words[..., j] |= (c[..., i] << sh) & 0xFFFFFFFF
        if sh + bits > 32:
            words[..., j + 1] |= c[..., i] >> (32 - sh)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(*words.shape[:-2], -1).to(torch.int32)


def unpack_reference(packed: torch.Tensor, bits: int, n: int, name: str = "packed") -> torch.Tensor:
    """Torch reference of :func:`unpack`. (..., packed_length) int32 -> (..., n) codes (uint8; int32 at 16 bits)."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {packed.dtype}")
    g, w = group_shape(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{name} has last dimension {packed.shape[-1]}, expected {packed_length(n, bits)} "
                         f"words for n={n} codes of {bits} bits")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = p.reshape(*p.shape[:-1], -1, w)
    mask = (1 << bits) - 1
    out = []
    for i in range(g):
        pos = bits * i
        j, sh = divmod(pos, 32)
        v = p[..., j] >> sh
        if sh + bits > 32:
            v = v | (p[..., j + 1] << (32 - sh))
        out.append(v & mask)
    codes = torch.stack(out, dim=-1).reshape(*p.shape[:-2], -1)[..., :n]
    return codes.to(code_dtype(bits))


def code_dtype(bits: int) -> torch.dtype:
    """dtype of unpacked codes: uint8 up to 8 bits, int32 for 16."""
    return torch.uint8 if bits <= 8 else torch.int32


def _unpack_ref_dispatch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_reference(packed, bits, n)


_UNPACK = register_op(Op("unpack", _unpack_ref_dispatch, "packing:unpack",
                         "int32 words -> unsigned low-bit codes (uint8)"))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last dim into int32 words (layout: module docstring).

    Packing runs offline (quantization), so it is always the torch reference.
    """
    return pack_reference(codes, bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack int32 words into ``n`` codes per row (uint8; int32 at 16 bits). Triton on CUDA, reference on CPU."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"packed has last dimension {packed.shape[-1]}, expected {packed_length(n, bits)} "
                         f"words for n={n} codes of {bits} bits")
    return _UNPACK(packed, bits, n, device=packed.device)

"""KV-cache quantizer of PM-KVQ: per-token, per-group asymmetric min-max codes, and b -> b/2 requant.

A K or V tensor (..., T, D) is quantized per token and per group of ``group`` channels along D:
``scale = (max - min) / (2**bits - 1)``, ``zero = min`` (a float), ``code = round((x - zero) / scale)``
in ``[0, 2**bits)``, packed along D with overdrive.kernels.packing (16-bit codes: 2 per word).
Every level, 16 bits included, is integer-coded.

Requantization b -> b/2 works on the integer codes without dequantizing:
``f = 2**(b/2) + 1``, ``code' = floor((2 * code + f) / (2 * f))`` (round half up; exact integer math,
so the top code 2**b - 1 maps to the top code 2**(b/2) - 1), ``scale' = scale * f``, zero kept.
"""
from __future__ import annotations

import torch

from .dispatch import Op, register_op
from .packing import pack_reference, packed_length, unpack_reference

KV_BITS = (16, 8, 4, 2)


def _check(bits: int, d: int, group: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"kv quantization: bits={bits} is not supported; use one of {KV_BITS}")
    if group <= 0 or d % group:
        raise ValueError(f"kv quantization: head size {d} is not a multiple of the group size {group}")


def kv_quantize_reference(x: torch.Tensor, bits: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed int32 (..., T, packed_length(D)), scale float32 (..., T, D/group), zero float32 (same))."""
    d = x.shape[-1]
    _check(bits, d, group)
    g = x.to(torch.float32).reshape(*x.shape[:-1], d // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    codes = torch.clamp(torch.floor((g - lo[..., None]) / scale[..., None] + 0.5), 0, (1 << bits) - 1)
    return pack_reference(codes.reshape(x.shape).to(torch.int64), bits), scale, lo


def kv_dequantize_reference(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, d: int,
                            group: int = 128, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check(bits, d, group)
    codes = unpack_reference(packed, bits, d).to(torch.float32)
    g = codes.reshape(*codes.shape[:-1], d // group, group)
    return (g * scale[..., None] + zero[..., None]).reshape(codes.shape).to(dtype)


def kv_requantize_reference(packed: torch.Tensor, scale: torch.Tensor, bits: int, d: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Halve the bit width of packed codes in the integer domain: (packed', scale')."""
    if bits not in KV_BITS or bits == 2:
        raise ValueError(f"kv requantization halves 16, 8 or 4 bits; got bits={bits} (below 2 bits is not allowed)")
    half = bits // 2
    f = (1 << half) + 1
    codes = unpack_reference(packed, bits, d).to(torch.int64)
    new = torch.div(2 * codes + f, 2 * f, rounding_mode="floor")
    return pack_reference(new, half), scale * f


_QUANT = register_op(Op("kv_quantize", kv_quantize_reference, "kv_quant:kv_quantize", "PM-KVQ per-token group quantizer"))
_REQUANT = register_op(Op("kv_requantize", kv_requantize_reference, "kv_quant:kv_requantize", "b -> b/2 integer requant"))


def kv_quantize(x: torch.Tensor, bits: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize K or V (..., T, D): (packed codes, scale, zero); format in the module docstring."""
    _check(bits, x.shape[-1], group)
    if not x.dtype.is_floating_point:
        raise TypeError(f"kv_quantize: x must be floating point, got {x.dtype}")
    return _QUANT(x, bits, group, device=x.device)


def kv_requantize(packed: torch.Tensor, scale: torch.Tensor, bits: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """b -> b/2 requantization of packed codes (integer domain); returns (packed', scale')."""
    if packed.shape[-1] != packed_length(d, bits) or packed.dtype != torch.int32:
        raise ValueError(f"kv_requantize: packed has shape {tuple(packed.shape)} ({packed.dtype}), expected last "
                         f"dimension {packed_length(d, bits)} int32 words for head size {d} at {bits} bits")
    return _REQUANT(packed, scale, bits, d, device=packed.device)


def kv_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, d: int,
                  group: int = 128, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes back to values (the decode attention kernel fuses this; this is the standalone form)."""
    return kv_dequantize_reference(packed, scale, zero, bits, d, group, dtype)

"""MxMoE's format quantizers and checkpoint tensors (a leaf: torch, overdrive.kernels, MBQ's GPTQ leaf).

Checkpoint tensors of one expert linear ``P`` (out N, in K) by format:

=============  ===================================  ===============================================
format         tensors                              weight
=============  ===================================  ===============================================
``wBgG``       ``P.qweight`` int32 (N, packed K),   ``(code - zeros[k // G]) * scales[k // G]``
               ``P.scales`` float16 (N, K/G),       (MBQ's weight-only layout; codes packed as in
               ``P.zeros`` uint8 (N, K/G)           overdrive.kernels.packing)
``w8a8``       ``P.qweight`` int8 (N, K),           ``code * scales[n]``, activations per-token
               ``P.scales`` float16 (N,)            int8
``w4a4``       ``P.qweight`` int32 (N, K/8) codes   ``code * scales[n]``, activations per-token
               + 8 packed, ``P.scales`` float16     int4 (qmax 7)
=============  ===================================  ===============================================
"""
from __future__ import annotations

import torch

from overdrive.config import ConfigError
from overdrive.kernels import pack, unpack
from overdrive.kernels.act8_linear import round_half_away
from overdrive.mbq.gptq import ChannelSymmetric, GroupAsymmetric, gptq, rtn

from .config import Format


def grid_of(fmt: Format) -> GroupAsymmetric | ChannelSymmetric:
    return GroupAsymmetric(fmt.bits, fmt.group_size) if fmt.weight_only else ChannelSymmetric(fmt.bits)


def tensor_names(fmt: Format) -> tuple[str, ...]:
    return ("qweight", "scales", "zeros") if fmt.weight_only else ("qweight", "scales")


def quantize_weight(w: torch.Tensor, fmt: Format, quantizer: str = "rtn", hessian: torch.Tensor | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(checkpoint tensors, dequantized float32 weight) of a (N, K) weight in ``fmt``.

    ``quantizer`` "gptq" needs ``hessian`` (K, K) of the linear's inputs (overdrive.mbq.gptq.Hessian)."""
    n, k = w.shape
    fmt.check_shape(k, f"weight {tuple(w.shape)}")
    grid = grid_of(fmt)
    if quantizer == "gptq":
        if hessian is None:
            raise ValueError("gptq needs the layer's Hessian")
        res = gptq(w.float(), hessian, grid)
    elif quantizer == "rtn":
        res = rtn(w.float(), grid)
    else:
        raise ConfigError(f"unknown quantizer {quantizer!r}; known: rtn, gptq")
    codes = res.codes.round().to(torch.int64)
    if fmt.weight_only:
        tensors = {"qweight": pack(codes, fmt.bits), "scales": res.scales.to(torch.float16),
                   "zeros": res.zeros.round().to(torch.uint8)}
    else:
        q = codes.to(torch.int8) if fmt.bits == 8 else pack(codes + 8, 4)
        tensors = {"qweight": q, "scales": res.scales.to(torch.float16)}
    return tensors, dequantize(tensors, fmt, k, torch.float32)


def codes_of(tensors: dict[str, torch.Tensor], fmt: Format, k: int) -> torch.Tensor:
    """Integer codes (N, K) int32: unsigned for weight-only formats, signed for W-A formats."""
    q = tensors["qweight"]
    if fmt.weight_only:
        return unpack(q, fmt.bits, k).to(torch.int32)
    if fmt.bits == 8:
        return q.to(torch.int32)
    return unpack(q, 4, k).to(torch.int32) - 8


def dequantize(tensors: dict[str, torch.Tensor], fmt: Format, k: int, dtype: torch.dtype = torch.float64
               ) -> torch.Tensor:
    """The (N, K) weight the tensors encode, computed in float64 and returned as ``dtype``."""
    codes = codes_of(tensors, fmt, k).to(torch.float64)
    s = tensors["scales"].to(torch.float64)
    if fmt.weight_only:
        z = tensors["zeros"].to(torch.float64)
        g = fmt.group_size
        w = (codes - z.repeat_interleave(g, dim=1)) * s.repeat_interleave(g, dim=1)
    else:
        w = codes * s[:, None]
    return w.to(dtype)


def check_tensors(tensors: dict[str, torch.Tensor], fmt: Format, n: int, k: int, where: str) -> None:
    """Reject checkpoint tensors whose names, dtypes or shapes do not fit ``fmt`` for an (N, K) linear."""
    from overdrive.kernels import packed_length

    want: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if fmt.weight_only:
        want = {"qweight": ((n, packed_length(k, fmt.bits)), torch.int32),
                "scales": ((n, k // fmt.group_size), torch.float16), "zeros": ((n, k // fmt.group_size), torch.uint8)}
    else:
        want = {"qweight": ((n, k) if fmt.bits == 8 else (n, packed_length(k, 4)),
                            torch.int8 if fmt.bits == 8 else torch.int32), "scales": ((n,), torch.float16)}
    for name, (shape, dt) in want.items():
        t = tensors.get(name)
        if t is None:
            raise ConfigError(f"{where}.{name}: missing from the checkpoint (format {fmt.name} needs "
                              f"{', '.join(want)})")
        ok_dtype = t.dtype == dt or (dt == torch.float16 and t.dtype.is_floating_point)
        if tuple(t.shape) != shape or not ok_dtype:
            raise ConfigError(f"{where}.{name}: expected {dt} {shape} for format {fmt.name}, got {t.dtype} "
                              f"{tuple(t.shape)}")


def quantize_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization of activations (..., K) to ``bits`` (8 or 4):
    ``s = max|x| / qmax``, codes rounded half away from zero; computed in float64, returned in x's dtype."""
    qmax = (1 << (bits - 1)) - 1
    xd = x.to(torch.float64)
    s = xd.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    return (round_half_away(xd / s).clamp(-qmax, qmax) * s).to(x.dtype)

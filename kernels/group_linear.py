"""Group-wise asymmetric low-bit weight-only linear (3 and 4 bits; the W3/W4 formats of MBQ/AWQ).

Weights of a (N, K) linear layer are stored as

* ``qweight`` int32 (N, packed_length(K, bits)): unsigned ``bits``-bit codes along K, packed with
  :mod:`overdrive.kernels.packing` (3-bit: 32 codes in 3 words);
* ``scales`` (N, K / group_size) floating; ``zeros`` (N, K / group_size) uint8 zero points (codes);

and ``W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g]``. The op computes
``y = x @ W.T + bias`` with fp32 accumulation in ``x``'s dtype. One Triton kernel unpacks, dequantizes
and multiplies tile by tile (no dequantized weight in memory); decode (M <= 16) uses a thin M tile.
"""
from __future__ import annotations

import torch

from .dispatch import Op, register_op
from .packing import packed_length, unpack_reference

BITS = (3, 4)
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         group_size: int, k: int) -> torch.Tensor:
    """The (N, K) float32 weight the packed tensors represent."""
    codes = unpack_reference(qweight, bits, k, name="qweight").to(torch.float32)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]
    return (codes - z) * s


def group_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_reference(qweight, scales, zeros, bits, group_size, x.shape[-1])
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


_OP = register_op(Op("group_linear", group_linear_reference, "group_linear:group_linear",
                     "x @ dequant(3/4-bit group-asymmetric W).T + bias, fused"))


def check_group_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bits: int, group_size: int, bias: torch.Tensor | None = None) -> None:
    """Validate shapes/dtypes, naming the tensor and what was expected."""
    if bits not in BITS:
        raise ValueError(f"group_linear: bits={bits} is not supported; use one of {BITS}")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"group_linear: group_size must be a positive multiple of 32, got {group_size}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"group_linear: x must be float16/bfloat16/float32, got {x.dtype}")
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"group_linear: input features {k} are not a multiple of group_size {group_size}")
    n = qweight.shape[0]
    want = {"qweight": ((n, packed_length(k, bits)), (torch.int32,)),
            "scales": ((n, k // group_size), (torch.float16, torch.bfloat16, torch.float32)),
            "zeros": ((n, k // group_size), (torch.uint8,))}
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        shape, dtypes = want[name]
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            raise ValueError(f"group_linear: {name} has shape {tuple(t.shape)} and dtype {t.dtype}, expected "
                             f"{shape} and {' or '.join(str(d) for d in dtypes)} for K={k}, bits={bits}, "
                             f"group_size={group_size}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"group_linear: bias has shape {tuple(bias.shape)}, expected ({n},)")


def group_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a 3/4-bit group-asymmetric packed ``W`` (format: module docstring)."""
    check_group_linear(x, qweight, scales, zeros, bits, group_size, bias)
    return _OP(x, qweight, scales, zeros, bits, group_size, bias, device=x.device)

"""Group-wise asymmetric low-bit weight-only linear (3 and 4 bits; the W3/W4 formats of MBQ/AWQ).

Weights of a (N, K) linear layer are stored as

* ``qweight`` int32 (N, packed_length(K, bits)): unsigned ``bits``-bit codes along K, packed with
  :mod:`overdrive.kernels.packing` (3-bit: 32 codes in 3 words);
* ``scales`` (N, K / group_size) floating; ``zeros`` (N, K / group_size) uint8 zero points (codes);

and ``W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g]``. The op computes
``y = x @ W.T + bias`` with fp32 accumulation in ``x``'s dtype.

The kernels run on a *kernel layout* prepared once at load time (:func:`prepare_group_weight`), the
layout fast Triton GEMV/GEMM kernels use:

* ``qweight_kn`` int32 (packed_length(K, bits), N): the same packing along K, transposed so that N
  is contiguous (a tile of words for consecutive output channels is one coalesced load);
* ``scales_kn`` (K / g, N) in the scales' dtype and ``szeros_kn`` (K / g, N) float32: the zero point
  *pre-multiplied* (``zero * scale``), so ``W[n, k] = code * scale - szero`` is one fused multiply-add.

:func:`group_linear_kn` is the op on that layout (Triton: M = 1 a split-K GEMV, an elementwise
product reduced with ``tl.sum`` over many small programs; M > 1 a split-K ``tl.dot`` GEMM; configs
autotuned per M bucket); :func:`group_linear` keeps the checkpoint-layout API (it prepares per call).
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


def prepare_group_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         group_size: int) -> dict[str, torch.Tensor]:
    """Checkpoint layout -> kernel layout (module docstring). Torch ops on the tensors' device; run once
    at load time. ``szeros_kn`` is float32 (zero * scale exactly as the reference forms it; 4/g bytes
    per weight, 3% of a W4 g128 layer's bytes)."""
    return {"qweight_kn": qweight.T.contiguous(), "scales_kn": scales.T.contiguous(),
            "szeros_kn": (zeros.to(torch.float32) * scales.to(torch.float32)).T.contiguous()}


def dequantize_kn_reference(qweight_kn: torch.Tensor, scales_kn: torch.Tensor, szeros_kn: torch.Tensor, bits: int,
                            group_size: int, k: int) -> torch.Tensor:
    """The (K, N) float32 weight (transposed) the kernel layout represents: code * scale - szero."""
    codes = unpack_reference(qweight_kn.T.contiguous(), bits, k, name="qweight_kn").to(torch.float32).T
    s = scales_kn.to(torch.float32).repeat_interleave(group_size, dim=0)[:k]
    z = szeros_kn.to(torch.float32).repeat_interleave(group_size, dim=0)[:k]
    return codes * s - z


def group_linear_kn_reference(x: torch.Tensor, qweight_kn: torch.Tensor, scales_kn: torch.Tensor,
                              szeros_kn: torch.Tensor, bits: int, group_size: int,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_kn_reference(qweight_kn, scales_kn, szeros_kn, bits, group_size, x.shape[-1])
    y = x.to(torch.float32) @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


_OP_KN = register_op(Op("group_linear_kn", group_linear_kn_reference, "group_linear:group_linear_kn",
                        "x @ W + bias on the kernel layout (N-contiguous codes, pre-multiplied zeros): split-K "
                        "GEMV (M = 1) / split-K tl.dot GEMM"))


def group_linear_kn(x: torch.Tensor, qweight_kn: torch.Tensor, scales_kn: torch.Tensor, szeros_kn: torch.Tensor,
                    bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` on the kernel layout made by :func:`prepare_group_weight`."""
    n = qweight_kn.shape[-1]
    k = _check("group_linear_kn", x, bits, group_size, bias, n)
    floats = (torch.float16, torch.bfloat16, torch.float32)
    _check_tensors("group_linear_kn", k, bits, group_size, {
        "qweight_kn": (qweight_kn, (packed_length(k, bits), n), (torch.int32,)),
        "scales_kn": (scales_kn, (k // group_size, n), floats),
        "szeros_kn": (szeros_kn, (k // group_size, n), floats)})
    return _OP_KN(x, qweight_kn, scales_kn, szeros_kn, bits, group_size, bias, device=x.device)


def _check(op: str, x: torch.Tensor, bits: int, group_size: int, bias: torch.Tensor | None, n: int) -> int:
    """Checks shared by both layouts; returns K."""
    if bits not in BITS:
        raise ValueError(f"{op}: bits={bits} is not supported; use one of {BITS}")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"{op}: group_size must be a positive multiple of 32, got {group_size}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: x must be float16/bfloat16/float32, got {x.dtype}")
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"{op}: input features {k} are not a multiple of group_size {group_size}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({n},)")
    return k


def _check_tensors(op: str, k: int, bits: int, group_size: int,
                   specs: dict[str, tuple[torch.Tensor, tuple[int, ...], tuple[torch.dtype, ...]]]) -> None:
    for name, (t, shape, dtypes) in specs.items():
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} and dtype {t.dtype}, expected "
                             f"{shape} and {' or '.join(str(d) for d in dtypes)} for K={k}, bits={bits}, "
                             f"group_size={group_size}")


def check_group_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bits: int, group_size: int, bias: torch.Tensor | None = None) -> None:
    """Validate shapes/dtypes, naming the tensor and what was expected."""
    n = qweight.shape[0]
    k = _check("group_linear", x, bits, group_size, bias, n)
    _check_tensors("group_linear", k, bits, group_size, {
        "qweight": (qweight, (n, packed_length(k, bits)), (torch.int32,)),
        "scales": (scales, (n, k // group_size), (torch.float16, torch.bfloat16, torch.float32)),
        "zeros": (zeros, (n, k // group_size), (torch.uint8,))})

def group_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a 3/4-bit group-asymmetric packed ``W`` (format: module docstring)."""
    check_group_linear(x, qweight, scales, zeros, bits, group_size, bias)
    return _OP(x, qweight, scales, zeros, bits, group_size, bias, device=x.device)


def prepare_group_linear(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         group_size: int) -> dict[str, torch.Tensor]:
    """Checkpoint layout -> the layout of the kernel that runs these tensors (once, at load time).

    CPU tensors with bfloat16/float16 scales: torch's packed int4 CPU GEMM
    (:mod:`overdrive.kernels.cpu_packed`; W4 as ``(q - 8) * s + (8 - z) * s``, W3 exactly as codes
    ``q - z + 8``; 4 bits per weight either way). Otherwise the Triton kernel layout
    (:func:`prepare_group_weight`). :func:`group_linear_prepared` runs either.
    """
    from .cpu_packed import prepare_int4pack, use_packed
    from .packing import unpack

    k = scales.shape[1] * group_size
    if use_packed(qweight.device, scales.dtype, qweight.shape[0], k) is None:
        codes = unpack(qweight, bits, k).to(torch.int32)
        if bits == 3:
            z = zeros.to(torch.int32).repeat_interleave(group_size, dim=1)
            return prepare_int4pack(codes - z + 8, scales, None, group_size, scales.dtype)
        offsets = (8.0 - zeros.to(torch.float32)) * scales.to(torch.float32)
        return prepare_int4pack(codes, scales, offsets, group_size, scales.dtype)
    return prepare_group_weight(qweight, scales, zeros, bits, group_size)


def group_linear_prepared(x: torch.Tensor, params: dict[str, torch.Tensor], bits: int, group_size: int,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` on what :func:`prepare_group_linear` returned."""
    if "int4pack" in params:
        from .cpu_packed import int4pack_linear

        sz = params["int4pack_sz"]
        return int4pack_linear(x.to(sz.dtype), params["int4pack"], sz, bias).to(x.dtype)
    return group_linear_kn(x, params["qweight_kn"], params["scales_kn"], params["szeros_kn"], bits, group_size, bias)

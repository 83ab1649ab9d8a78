"""W8A8 / W4A8 linear: int8 GEMM with per-token dynamic activation quantization fused in.

Weights are symmetric per output channel: ``W[n, :] = q[n, :] * w_scales[n]`` with ``q`` int8 in
[-127, 127] (``wbits=8``, stored as int8 (N, K)) or int4 in [-7, 7] (``wbits=4``, stored as
unsigned codes ``q + 8`` packed 8 per int32 word, overdrive.kernels.packing). Activations are
quantized per token on the fly: ``sx[m] = max|x[m, :]| / 127``, ``xq = round(x / sx)`` (half away from
zero). ``y = (xq @ q.T) * sx[:, None] * w_scales[None, :] + bias`` with exact integer accumulation.

Optional ``smooth`` (K,) is a per-input-channel divisor applied before the activation is quantized
(SmoothQuant-style channel balancing: the weights were multiplied by it before they were quantized):
``x~ = x / smooth``, then ``x~`` is quantized per token as above. The division is fused into the
kernel's quantization (no extra pass over the activations).
"""
from __future__ import annotations

import torch

from .dispatch import Op, register_op
from .packing import packed_length, unpack_reference

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes as float64, per-token scales float64) of a (M, K) activation (divided by ``smooth``)."""
    xd = x.to(torch.float64)
    if smooth is not None:
        xd = xd / smooth.to(torch.float64)
    sx = xd.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    return round_half_away(xd / sx[:, None]).clamp(-127, 127), sx


def weight_codes(qweight: torch.Tensor, wbits: int, k: int) -> torch.Tensor:
    """Signed integer weight codes (N, K) as float64."""
    if wbits == 8:
        return qweight.to(torch.float64)
    return unpack_reference(qweight, 4, k).to(torch.float64) - 8.0


def act8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, wbits: int,
                          bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, sx = quantize_per_token(x2, smooth)
    acc = xq @ weight_codes(qweight, wbits, k).T  # exact: |terms| <= 127*127*K < 2**53
    y = acc * sx[:, None] * w_scales.to(torch.float64)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


_OP = register_op(Op("act8_linear", act8_linear_reference, "act8_linear:act8_linear",
                     "int8 GEMM with fused per-token activation quantization (W8A8 / W4A8)"))


def act8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, wbits: int,
                bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """``y = Qa(x / smooth) @ W.T + bias`` for W8A8 (``wbits=8``) or W4A8 (``wbits=4``); format in the
    module doc (``smooth`` None: no channel balancing)."""
    if wbits not in (4, 8):
        raise ValueError(f"act8_linear: wbits={wbits} is not supported; use 4 or 8")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"act8_linear: x must be float16/bfloat16/float32, got {x.dtype}")
    k = x.shape[-1]
    n = qweight.shape[0]
    shape, dtype = ((n, k), torch.int8) if wbits == 8 else ((n, packed_length(k, 4)), torch.int32)
    if tuple(qweight.shape) != shape or qweight.dtype != dtype:
        raise ValueError(f"act8_linear: qweight has shape {tuple(qweight.shape)} and dtype {qweight.dtype}, "
                         f"expected {shape} and {dtype} for K={k}, wbits={wbits}")
    if tuple(w_scales.shape) != (n,) or not w_scales.dtype.is_floating_point:
        raise ValueError(f"act8_linear: w_scales must be a floating ({n},) tensor, got {w_scales.dtype} "
                         f"{tuple(w_scales.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"act8_linear: bias has shape {tuple(bias.shape)}, expected ({n},)")
    if smooth is not None and (tuple(smooth.shape) != (k,) or not smooth.dtype.is_floating_point):
        raise ValueError(f"act8_linear: smooth must be a floating ({k},) tensor (one divisor per input channel), "
                         f"got {smooth.dtype} {tuple(smooth.shape)}")
    if smooth is None:  # keep the call signature of kernels that predate `smooth`
        return _OP(x, qweight, w_scales, wbits, bias, device=x.device)
    return _OP(x, qweight, w_scales, wbits, bias, smooth=smooth, device=x.device)


def prepare_act8_linear(qweight: torch.Tensor, w_scales: torch.Tensor, wbits: int) -> dict[str, torch.Tensor]:
    """Checkpoint layout -> the layout of the kernel that runs it (once, at load time): on CPU with
    bfloat16/float16 scales torch's packed int8 / int4 CPU GEMMs (:mod:`overdrive.kernels.cpu_packed`),
    otherwise unchanged (``qweight``, ``scales``). :func:`act8_linear_prepared` runs either."""
    from .cpu_packed import prepare_act8_packed, use_packed

    k = qweight.shape[1] if wbits == 8 else qweight.shape[1] * 8
    if use_packed(qweight.device, w_scales.dtype, qweight.shape[0], k) is None:
        codes = qweight if wbits == 8 else unpack_reference(qweight, 4, k).to(torch.int32) - 8
        return prepare_act8_packed(codes, w_scales, wbits, w_scales.dtype)
    return {"qweight": qweight, "scales": w_scales}


def act8_linear_prepared(x: torch.Tensor, params: dict[str, torch.Tensor], wbits: int,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 / W4A8 ``x @ W.T + bias`` on what :func:`prepare_act8_linear` returned."""
    if "qweight" in params:
        return act8_linear(x, params["qweight"], params["scales"], wbits, bias)
    from .cpu_packed import act8_packed_linear

    return act8_packed_linear(x, params, bias)

"""int8 weight-only linear (symmetric per-output-channel weights, floating activations).

``y = x @ (qweight * scale[:, None]).T + bias`` with fp32 accumulation, in ``x``'s dtype.
"""
from __future__ import annotations

import torch

from .dispatch import Op, register_op

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def int8_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    w = qweight.to(torch.float32) * scale.to(torch.float32)[:, None]
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


_OP = register_op(Op("int8_weight_linear", int8_weight_linear_reference, "int8_linear:int8_weight_linear",
                     "x @ (int8 W * per-channel scale).T + bias"))


def _check(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"int8_weight_linear: x must be float16/bfloat16/float32, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"int8_weight_linear: qweight must be a 2-D int8 (N, K) tensor, got "
                        f"{qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"int8_weight_linear: x has {x.shape[-1]} input features, qweight expects {k}")
    if scale.shape != (n,) or not scale.dtype.is_floating_point:
        raise ValueError(f"int8_weight_linear: scale must be a floating ({n},) tensor, got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"int8_weight_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    devs = {t.device for t in (x, qweight, scale) + ((bias,) if bias is not None else ())}
    if len(devs) > 1:
        raise ValueError(f"int8_weight_linear: tensors are on different devices {sorted(map(str, devs))}")


def int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias``; x (..., K), qweight int8 (N, K), scale (N,)."""
    _check(x, qweight, scale, bias)
    return _OP(x, qweight, scale, bias, device=x.device)

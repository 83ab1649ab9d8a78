"""MBQ's weight formats as math (a leaf: torch and overdrive.kernels only): round-to-nearest codes, the
checkpoint tensors, and the quantize-dequantize functions the scale search uses."""
from __future__ import annotations

import torch

from overdrive.config import ConfigError
from overdrive.kernels import pack

from .config import MBQConfig


def rtn_codes(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric group quantization of a (N, K) weight.

    Returns float32 (codes (N, K/g, g), scales (N, K/g), zeros (N, K/g)) with
    ``W ~ (codes - zeros) * scales`` per group.
    """
    n, k = w.shape
    if k % group_size:
        raise ConfigError(f"{k} input features are not a multiple of group size {group_size}")
    qmax = (1 << bits) - 1
    g = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    wmin = g.amin(dim=2).clamp(max=0.0)
    wmax = g.amax(dim=2).clamp(min=0.0)
    scales = ((wmax - wmin) / qmax).clamp(min=1e-8)
    zeros = torch.round(-wmin / scales).clamp(0, qmax)
    codes = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, qmax)
    return codes, scales, zeros


def rtn_per_channel_symmetric(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel RTN: (signed codes float32 (N, K), scales float32 (N,))."""
    qmax = (1 << (bits - 1)) - 1  # 127 for 8 bits, 7 for 4 bits
    w32 = w.detach().to(torch.float32)
    scales = (w32.abs().amax(dim=1) / qmax).clamp(min=1e-8)
    codes = torch.clamp(torch.round(w32 / scales[:, None]), -qmax, qmax)
    return codes, scales


def act8_tensors(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """W8A8/W4A8 checkpoint tensors from signed codes (N, K) and per-output-channel scales (N,)."""
    q = codes.to(torch.int8) if bits == 8 else pack((codes.to(torch.int64) + 8), 4)
    return {"qweight": q, "scales": scales.to(torch.float16)}


def group_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Weight-only checkpoint tensors qweight/scales/zeros from unsigned codes (N, K) and per-group
    scales / zero points (N, K/group)."""
    return {"qweight": pack(codes.to(torch.int64), bits), "scales": scales.to(torch.float16),
            "zeros": zeros.to(torch.uint8)}


def rtn_act8_tensors(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """W8A8/W4A8 checkpoint tensors of a (N, K) weight."""
    return act8_tensors(*rtn_per_channel_symmetric(w, bits), bits)


def rtn_group_asymmetric(w: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """RTN of a (N, K) weight into the checkpoint tensors qweight/scales/zeros."""
    codes, scales, zeros = rtn_codes(w, bits, group_size)
    return group_tensors(codes.reshape(w.shape), scales, zeros, bits)


def rtn_fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest group-asymmetric quantize-dequantize of a (N, K) weight (float32 math)."""
    codes, scales, zeros = rtn_codes(w, bits, group_size)
    n, k = w.shape
    return ((codes - zeros[..., None]) * scales[..., None]).reshape(n, k).to(w.dtype)


def fake_quant_weight(w: torch.Tensor, cfg: MBQConfig) -> torch.Tensor:
    """Quantize-dequantize a weight with the scheme's weight format."""
    if cfg.act_bits == 8:
        codes, scales = rtn_per_channel_symmetric(w, cfg.bits)
        return (codes * scales[:, None]).to(w.dtype)
    return rtn_fake_quant(w, cfg.bits, cfg.group_size)


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 quantize-dequantize (W4A8/W8A8 activations)."""
    from overdrive.kernels.act8_linear import quantize_per_token

    xq, sx = quantize_per_token(x.reshape(-1, x.shape[-1]))
    return (xq * sx[:, None]).to(x.dtype).reshape(x.shape)

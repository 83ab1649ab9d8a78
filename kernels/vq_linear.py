"""Vector-quantized linear (PCDVQ's layout): ``y = x @ W^T`` with ``W`` decoded on the fly from codes.

``W[n, 8j:8j+8] = scales[n] * levels[mag[n, j]] * codebook[dir[n, j]]`` with ``dir`` (N, V) int32
codes into ``codebook`` (C, 8) and ``mag`` (N, V) int32 codes into ``levels`` (L,); ``x`` is (M, 8V)
(already rotated by the caller). The Triton kernel (M rows × tiles of N outputs) gathers the codewords
of a tile, scales them by their magnitude levels and reduces against ``x``; nothing but codes,
the small codebooks and ``x`` is read. Torch reference: decode, then a matmul.
"""
from __future__ import annotations

import torch

from .dispatch import Op, register_op


def decode_vq(dir_codes: torch.Tensor, mag_codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor,
              levels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``W`` (N, 8V) in ``dtype``."""
    vec = codebook.to(dtype)[dir_codes.long()] * levels.to(dtype)[mag_codes.long()][..., None]
    return vec.reshape(dir_codes.shape[0], -1) * scales.to(dtype)[:, None]


def _vq_linear_reference(x: torch.Tensor, dir_codes: torch.Tensor, mag_codes: torch.Tensor, scales: torch.Tensor,
                         codebook: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = decode_vq(dir_codes, mag_codes, scales, codebook, levels, dt)
    return (x.to(dt) @ w.T).to(x.dtype)


_OP = register_op(Op("vq_linear", _vq_linear_reference, "vq_linear:vq_linear",
                     "8-dim vector-quantized linear: codebook gather x magnitude level x row scale"))


def vq_linear(x: torch.Tensor, dir_codes: torch.Tensor, mag_codes: torch.Tensor, scales: torch.Tensor,
              codebook: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``x`` (..., 8V) -> (..., N); see the module doc."""
    n, v = dir_codes.shape
    if x.shape[-1] != 8 * v or tuple(mag_codes.shape) != (n, v) or tuple(scales.shape) != (n,) \
            or codebook.shape[-1] != 8:
        raise ValueError(f"vq_linear: x {tuple(x.shape)}, dir_codes {tuple(dir_codes.shape)}, mag_codes "
                         f"{tuple(mag_codes.shape)}, scales {tuple(scales.shape)}, codebook {tuple(codebook.shape)} "
                         "do not fit (x (..., 8V), codes (N, V), scales (N,), codebook (C, 8))")
    y = _OP(x.reshape(-1, 8 * v), dir_codes, mag_codes, scales, codebook, levels, device=x.device)
    return y.reshape(*x.shape[:-1], n)

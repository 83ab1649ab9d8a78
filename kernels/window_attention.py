"""Head-wise window ("band") and arrow attention for DiT attention compression (DiTFastAttn v1/v2).

For queries/keys/values (B, H, S, D), head ``h`` lets query ``i`` attend to key ``j`` when

* ``|i - j| <= window[h]`` (a band of half-width ``window[h]``; ``window[h] >= S - 1`` is full attention), or
* ``i`` or ``j`` is a text token, i.e. lies in ``[text_start, text_end)`` ("arrow" attention of MMDiT
  models: text rows and columns stay full; an empty range gives plain window attention).

Softmax scale ``1/sqrt(D)`` unless given. The Triton kernel is a flash-attention loop that only visits
key blocks intersecting the band or the text range, so its cost follows the band's real FLOPs.
"""
from __future__ import annotations

import math

import torch

from .dispatch import Op, register_op


def allowed_mask(s: int, window: torch.Tensor, text_start: int = 0, text_end: int = 0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (H, S, S) mask of allowed (query, key) pairs."""
    i = torch.arange(s, device=device)
    band = (i[:, None] - i[None, :]).abs()[None] <= window.to(device).reshape(-1, 1, 1)
    text = (i >= text_start) & (i < text_end)
    return band | text[None, :, None] | text[None, None, :]


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor,
                               text_start: int = 0, text_end: int = 0, scale: float | None = None) -> torch.Tensor:
    s, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = allowed_mask(s, window, text_start, text_end, q.device)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask[None], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v.float()).to(q.dtype)


_OP = register_op(Op("window_attention", window_attention_reference, "window_attention:window_attention",
                     "head-wise band / arrow attention (DiTFastAttn)"))


def attention_flops(s: int, d: int, window: torch.Tensor, text_start: int = 0, text_end: int = 0) -> int:
    """Exact multiply-add FLOPs of QK^T and PV over the allowed pairs, summed over heads (per batch item)."""
    return int(allowed_mask(s, window, text_start, text_end).sum()) * 4 * d


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor,
                     text_start: int = 0, text_end: int = 0, scale: float | None = None) -> torch.Tensor:
    """Head-wise band/arrow attention (semantics in the module docstring); q, k, v (B, H, S, D)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"window_attention: q, k, v must share one (B, H, S, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    h, s = q.shape[1], q.shape[2]
    if window.shape != (h,) or window.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"window_attention: window must be an integer ({h},) tensor (one half-width per head), "
                         f"got {window.dtype} {tuple(window.shape)}")
    if (window < 0).any():
        raise ValueError("window_attention: window half-widths must be >= 0")
    if not 0 <= text_start <= text_end <= s:
        raise ValueError(f"window_attention: text range [{text_start}, {text_end}) is not inside [0, {s}]")
    return _OP(q, k, v, window, text_start, text_end, scale, device=q.device)

"""Head-wise window ("band") and arrow attention for DiT attention compression (DiTFastAttn v1/v2).

For queries/keys/values (B, H, S, D), head ``h`` lets query ``i`` attend to key ``j`` when

* ``|i - j| <= window[h]`` (a band of half-width ``window[h]``; ``window[h] >= S - 1`` is full attention), or
* ``i`` or ``j`` is a text token, i.e. lies in ``[text_start, text_end)`` ("arrow" attention of MMDiT
  models: text rows and columns stay full; an empty range gives plain window attention).

Softmax scale ``1/sqrt(D)`` unless given. The Triton kernel is a flash-attention loop that only visits
key blocks intersecting the band or the text range, so its cost follows the band's real FLOPs. On CPU
the op runs :func:`window_attention_blocked`, the same block-sparse schedule in torch (query chunks
attend to the key slice their band touches, plus the text keys, through SDPA), so CPU time also
follows the band; :func:`window_attention_reference` is the dense masked definition used by tests.
"""
from __future__ import annotations

import functools
import math

import torch

from typing import Any

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
    ct = torch.promote_types(q.dtype, torch.float32)  # float64 inputs stay float64
    logits = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask[None], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v.to(ct)).to(q.dtype)


def window_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor,
                             text_start: int = 0, text_end: int = 0, scale: float | None = None,
                             chunk: int = 256) -> torch.Tensor:
    """Block-sparse torch implementation: cost proportional to the allowed pairs (plus chunk edges).

    Heads are grouped by half-width; full-width heads go through one SDPA call. For a band head, the
    queries of each ``chunk`` attend to the keys ``[c0 - w, c1 + w)`` plus the text keys, masked to
    the exact band; text query rows attend to every key.
    """
    import torch.nn.functional as F

    b, h, s, d = q.shape
    out = torch.empty_like(q)
    has_text = text_end > text_start
    text_keys = torch.arange(text_start, text_end, device=q.device)
    for w in sorted(set(int(x) for x in window.tolist())):
        heads = (window == w).nonzero().flatten().tolist()
        hq, hk, hv = q[:, heads], k[:, heads], v[:, heads]
        if w >= s - 1:
            res = F.scaled_dot_product_attention(hq, hk, hv, scale=scale)
        else:
            res = torch.empty_like(hq)
            for c0 in range(0, s, chunk):
                c1 = min(s, c0 + chunk)
                k0, k1 = max(0, c0 - w), min(s, c1 + w)
                keys = torch.arange(k0, k1, device=q.device)
                if has_text:
                    extra = text_keys[(text_keys < k0) | (text_keys >= k1)]
                    keys = torch.cat([extra, keys])
                rows = torch.arange(c0, c1, device=q.device)
                mask = ((rows[:, None] - keys[None, :]).abs() <= w)
                if has_text:
                    mask |= ((keys >= text_start) & (keys < text_end))[None, :]
                res[:, :, c0:c1] = F.scaled_dot_product_attention(
                    hq[:, :, c0:c1], hk[:, :, keys], hv[:, :, keys], attn_mask=mask, scale=scale)
            if has_text:  # text rows see every key
                res[:, :, text_start:text_end] = F.scaled_dot_product_attention(
                    hq[:, :, text_start:text_end], hk, hv, scale=scale)
        out[:, heads] = res
    return out


_OP = register_op(Op("window_attention", window_attention_blocked, "window_attention:window_attention",
                     "head-wise band / arrow attention (DiTFastAttn)"))


@functools.lru_cache(maxsize=4096)
def allowed_pairs(s: int, w: int, text_start: int = 0, text_end: int = 0) -> int:
    """Number of allowed (query, key) pairs of one head, in closed form (equals ``allowed_mask(...).sum()``)."""
    def band(n: int) -> int:  # pairs |i - j| <= w among n positions
        m = min(max(w, 0), n - 1) if n > 0 else 0
        return n + 2 * (m * n - m * (m + 1) // 2)

    t = text_end - text_start
    if t <= 0:
        return band(s)
    rows = sum(min(s - 1, i + w) - max(0, i - w) + 1 for i in range(text_start, text_end))
    # band pairs + text rows/cols (t * (2s - t)) - band pairs already in text rows or cols
    return band(s) + t * (2 * s - t) - (2 * rows - band(t))


def attention_flops(s: int, d: int, window: torch.Tensor, text_start: int = 0, text_end: int = 0) -> int:
    """Exact multiply-add FLOPs of QK^T and PV over the allowed pairs, summed over heads (per batch item)."""
    return sum(allowed_pairs(s, int(w), text_start, text_end) for w in window.reshape(-1).tolist()) * 4 * d


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


# ------------------------------------------------------------------------ FlexAttention (CUDA)
# The same band/arrow through PyTorch's FlexAttention with a cached block mask: a comparison for the
# GPU benchmark, not the default. Measured on an H100 (docs/benchmarks, 2026-11-22) it was 1.0-1.2x
# faster than the Triton kernel at 2K-Flux lengths, while building the block mask from a dense mask
# ran out of memory at Wan-480p length (40 heads x 32760^2); the block mask is built compiled here.
_FLEX: dict[Any, Any] = {}


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor,
                          text_start: int = 0, text_end: int = 0, scale: float | None = None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    h, s = q.shape[1], q.shape[2]
    key = (h, s, tuple(int(x) for x in window.tolist()), text_start, text_end, q.device)
    block_mask = _FLEX.get(key)
    if block_mask is None:
        w = window.to(device=q.device, dtype=torch.int64)
        t0, t1 = text_start, text_end

        def mask_mod(b, hh, qi, ki):  # noqa: ANN001
            return ((qi - ki).abs() <= w[hh]) | ((qi >= t0) & (qi < t1)) | ((ki >= t0) & (ki < t1))

        block_mask = create_block_mask(mask_mod, B=None, H=h, Q_LEN=s, KV_LEN=s, device=q.device, _compile=True)
        if len(_FLEX) > 256:
            _FLEX.clear()
        _FLEX[key] = block_mask
    fn = _FLEX.get("compiled")
    if fn is None:
        fn = _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return fn(q, k, v, block_mask=block_mask, scale=scale)

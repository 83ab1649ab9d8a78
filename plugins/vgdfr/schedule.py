"""VGDFR's frame-rate schedule: score aligned chunks of latent frames by how alike their frames are,
merge the chunks above a threshold, and pick the threshold for a target keep ratio.

Layout (latent frame indices, causal VAE with ``r`` pixel frames per latent frame):

* frame 0 (the first pixel frame alone) and the last ``protect_tail`` frames are never merged;
* the frames between are cut into aligned chunks of ``max_merge`` frames (a partial last chunk is
  kept as is);
* merging a chunk of ``m`` latent frames turns its ``r * m`` pixel frames into ``r`` frames, each the
  merge of ``m`` consecutive ones, so its **score** is the lowest SSIM between consecutive pixel
  frames inside any of those runs of ``m`` (``m = 2``: the pairs (0,1), (2,3), ...), the lowest over
  the batch too. Scored on latent frames, it is the lowest SSIM between consecutive latent frames
  of the chunk;
* with ``max_merge = 4`` each half of a chunk is also a candidate 2x merge: a chunk becomes one frame
  when its own score exceeds the threshold, else each half is merged or kept by its score.

Threshold mode merges what exceeds the threshold. Keep-ratio mode chooses among the thresholds just
below each distinct score (the finite set a bisection over thresholds can land on) the one whose
keep ratio comes closest to the target, preferring fewer merges on a tie.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from overdrive.contracts.frame_rate import FrameRateSchedule
from overdrive.metrics import ssim_per_image


@dataclasses.dataclass(frozen=True)
class Chunk:
    start: int                       # first latent frame
    size: int                        # max_merge
    score: float                     # merging all `size` frames
    halves: tuple[float, float] | None = None  # size 4: merging each half


def consecutive_ssim(frames: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(F - 1,) SSIM of frames (i, i + 1) of a (B, F, C, H, W) batch, the lowest over the batch."""
    b, f = frames.shape[:2]
    if f < 2:
        return torch.empty(0, dtype=torch.float64)
    a = frames[:, :-1].reshape(-1, *frames.shape[2:])
    z = frames[:, 1:].reshape(-1, *frames.shape[2:])
    return ssim_per_image(a.float(), z.float(), data_range).reshape(b, f - 1).amin(0).cpu()


def _first_pixel(latent: int, r: int, causal_first: bool) -> int:
    return 1 + r * (latent - 1) if causal_first else r * latent


def chunk_layout(latent_frames: int, max_merge: int, protect_tail: int, causal_first: bool) -> list[int]:
    """Start frames of the candidate chunks."""
    first = 1 if causal_first else 0
    stop = latent_frames - protect_tail
    return list(range(first, stop - max_merge + 1, max_merge))


def score_chunks(frames: torch.Tensor, latent_frames: int, *, pixels: bool, temporal_factor: int, causal_first: bool,
                 max_merge: int, protect_tail: int) -> list[Chunk]:
    """The candidate chunks of a (B, F, C, H, W) video: pixel frames in [0, 1] (``pixels``) or latent frames."""
    r = temporal_factor
    want = (1 + r * (latent_frames - 1) if causal_first else r * latent_frames) if pixels else latent_frames
    if frames.dim() != 5 or frames.shape[1] != want:
        raise ValueError(f"VGDFR schedule: expected (B, {want}, C, H, W) {'pixel' if pixels else 'latent'} frames for "
                         f"{latent_frames} latent frames, got {tuple(frames.shape)}")
    if pixels:
        sim = consecutive_ssim(frames)
    else:
        lo, hi = float(frames.amin()), float(frames.amax())
        sim = consecutive_ssim(frames, data_range=max(hi - lo, 1e-6))

    def score(start: int, m: int) -> float:
        if pixels:
            p = _first_pixel(start, r, causal_first)
            pairs = [p + m * k + j for k in range(r) for j in range(m - 1)]
        else:
            pairs = list(range(start, start + m - 1))
        return float(sim[pairs].min())

    out = []
    for s in chunk_layout(latent_frames, max_merge, protect_tail, causal_first):
        halves = (score(s, 2), score(s + 2, 2)) if max_merge == 4 else None
        out.append(Chunk(s, max_merge, score(s, max_merge), halves))
    return out


def groups_at(chunks: list[Chunk], latent_frames: int, threshold: float) -> tuple[int, ...]:
    """Group sizes when every candidate scoring above ``threshold`` is merged."""
    groups: list[int] = []
    at = 0
    for c in chunks:
        groups.extend([1] * (c.start - at))
        if c.score > threshold:
            groups.append(c.size)
        elif c.halves is not None:
            for h in c.halves:
                groups.extend([2] if h > threshold else [1, 1])
        else:
            groups.extend([1] * c.size)
        at = c.start + c.size
    groups.extend([1] * (latent_frames - at))
    return tuple(groups)


def choose(chunks: list[Chunk], latent_frames: int, *, threshold: float | None, target: float | None,
           temporal_factor: int, causal_first: bool) -> FrameRateSchedule:
    """The schedule for a threshold, or for the threshold whose keep ratio is closest to ``target``."""
    scores = tuple(c.score for c in chunks)
    meta = dict(temporal_factor=temporal_factor, causal_first=causal_first, scores=scores)
    if threshold is not None:
        return FrameRateSchedule(groups_at(chunks, latent_frames, threshold), threshold=threshold, **meta)
    assert target is not None
    values = sorted({c.score for c in chunks} | {h for c in chunks for h in (c.halves or ())}, reverse=True)
    best: tuple[float, int, tuple[int, ...], float | None] | None = None
    for thr in [math.inf] + [math.nextafter(v, -math.inf) for v in values]:
        g = groups_at(chunks, latent_frames, thr)
        miss = abs(len(g) / latent_frames - target)
        if best is None or miss < best[0] - 1e-12:
            best = (miss, len(g), g, None if thr == math.inf else thr)
    return FrameRateSchedule(best[2], threshold=best[3], **meta)

"""The frame-rate-schedule contract (kind ``frame_rate_schedule``): dynamic latent frame rate for video.

A video latent of ``T`` frames is shortened to ``T'`` frames where consecutive frames are alike
(VGDFR during denoising, DLFR-VAE at the VAE), computed on at the shorter length, and the pixel
frames are restored afterwards by interpolation. This module is framework-neutral (plain torch):

* :class:`FrameRateSchedule` — which consecutive original latent frames each compact frame stands
  for (group sizes), and the pixel-frame bookkeeping of causal video VAEs (latent frame 0 = pixel
  frame 0; every later latent frame = ``temporal_factor`` pixel frames);
* group operations on any tensor with a frame axis: :func:`merge_groups` (mean), :func:`group_starts`
  (the original noise of the kept frames), :func:`restore_frames` (resample decoded compact frames
  at the original pixel times with a pluggable two-frame :data:`Interpolator`);
* flow-matching algebra shared by every frame-rate method: :func:`flow_x0` (x̂0 from one Euler step)
  and :func:`flow_renoise` (x_t = σ ε + (1 − σ) x0);
* :class:`FrameRateMethod` — what a method decides: when to compact (:class:`CompactionPlan`), the
  schedule from pixel or latent frames, how to merge, which transformer blocks keep the original
  temporal positions (per-block RoPE), and the interpolator.

Adapters own the framework side: running the denoising loop, the VAE, the scheduler and the
transformer's rotary embeddings (``overdrive.adapters.diffusers.frame_rate``).
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import ConfigError, MethodConfig, atomic_write_text, read_json

#: ``interp(a, b, w) -> frames``: frames between ``a`` and ``b`` (same shape, a batch of frames along
#: dim 0) at fractions ``w`` (shape (N,), 0 = a, 1 = b). A real frame-interpolation model fits here.
Interpolator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULE_VERSION = 1


def blend(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Flow-free linear blend ``(1 - w) a + w b`` (the default interpolator)."""
    w = w.to(a.dtype).reshape(-1, *([1] * (a.dim() - 1)))
    return a + w * (b - a)


def nearest(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The nearer of the two frames (ties go to ``a``): frame repetition, no new pixels."""
    pick = (w > 0.5).reshape(-1, *([1] * (a.dim() - 1)))
    return torch.where(pick, b, a)


@dataclasses.dataclass(frozen=True)
class FrameRateSchedule:
    """Which original latent frames each compact latent frame stands for.

    groups           group sizes in frame order: compact frame ``j`` replaces ``groups[j]``
                     consecutive original latent frames (1 = kept as is)
    temporal_factor  pixel frames per latent frame (4 for Wan / HunyuanVideo / CogVideoX VAEs)
    causal_first     latent frame 0 is a single pixel frame (causal video VAEs); it is never merged
    step             denoising steps run at full length before the compaction (None outside denoising)
    threshold        the similarity threshold a chunk had to exceed to be merged (None if not chosen
                     by threshold)
    scores           the similarity score of every candidate chunk, in frame order (for the record)
    """

    groups: tuple[int, ...]
    temporal_factor: int = 4
    causal_first: bool = True
    step: int | None = None
    threshold: float | None = None
    scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        if not self.groups or any(g < 1 for g in self.groups):
            raise ConfigError(f"FrameRateSchedule.groups must be positive sizes, got {list(self.groups)}")
        if self.temporal_factor < 1:
            raise ConfigError(f"FrameRateSchedule.temporal_factor must be >= 1, got {self.temporal_factor}")
        if self.causal_first and self.groups[0] != 1:
            raise ConfigError("FrameRateSchedule.groups[0] must be 1 with causal_first: latent frame 0 is the "
                              f"first pixel frame alone and is never merged (got {list(self.groups)})")

    @classmethod
    def identity(cls, latent_frames: int, **kw: Any) -> "FrameRateSchedule":
        return cls((1,) * latent_frames, **kw)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def latent_frames(self) -> int:
        return sum(self.groups)

    @property
    def compact_frames(self) -> int:
        return len(self.groups)

    @property
    def keep_ratio(self) -> float:
        """Compact / original latent frames = vision tokens kept by the transformer."""
        return self.compact_frames / self.latent_frames

    @property
    def is_identity(self) -> bool:
        return all(g == 1 for g in self.groups)

    @property
    def starts(self) -> tuple[int, ...]:
        """Original index of the first latent frame of each group: the compact frames' original positions."""
        out, s = [], 0
        for g in self.groups:
            out.append(s)
            s += g
        return tuple(out)

    def pixel_frames(self, latent_frames: int | None = None) -> int:
        """Pixel frames of a video of ``latent_frames`` latent frames (default: the original length)."""
        n = self.latent_frames if latent_frames is None else latent_frames
        return 1 + self.temporal_factor * (n - 1) if self.causal_first else self.temporal_factor * n

    def _first_pixel(self, latent: int) -> int:
        return 1 + self.temporal_factor * (latent - 1) if self.causal_first else self.temporal_factor * latent

    def pixel_groups(self) -> tuple[int, ...]:
        """Group sizes over the original pixel frames: a group of ``m`` latent frames becomes
        ``temporal_factor`` compact pixel frames, each the merge of ``m`` consecutive pixel frames."""
        out: list[int] = []
        for start, m in zip(self.starts, self.groups):
            out.extend([1] if self.causal_first and start == 0 else [m] * self.temporal_factor)
        return tuple(out)

    def compact_pixel_times(self) -> torch.Tensor:
        """(F',) float64: the original pixel time of every frame of the decoded compact video (the
        centre of the pixel frames it merges)."""
        times: list[float] = []
        for start, m in zip(self.starts, self.groups):
            if self.causal_first and start == 0:
                times.append(0.0)
                continue
            p = self._first_pixel(start)
            times.extend(p + m * k + (m - 1) / 2 for k in range(self.temporal_factor))
        return torch.tensor(times, dtype=torch.float64)

    # -- records -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["groups"], d["scores"] = list(self.groups), list(self.scores)
        return {"version": SCHEDULE_VERSION, **d, "latent_frames": self.latent_frames,
                "compact_frames": self.compact_frames, "keep_ratio": self.keep_ratio,
                "original_positions": list(self.starts)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "schedule") -> "FrameRateSchedule":
        if not isinstance(data, dict) or "groups" not in data:
            raise ConfigError(f"{source}: expected a frame-rate schedule object with 'groups'")
        if data.get("version", SCHEDULE_VERSION) > SCHEDULE_VERSION:
            raise ConfigError(f"{source}: schedule version {data['version']} is newer than this overdrive reads "
                              f"({SCHEDULE_VERSION})")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            s = cls(**{k: v for k, v in data.items() if k in fields})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not a frame-rate schedule ({e})") from None
        for derived in ("latent_frames", "compact_frames"):
            if derived in data and data[derived] != getattr(s, derived):
                raise ConfigError(f"{source}: {derived}={data[derived]} disagrees with groups {list(s.groups)}")
        return s

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], option: str = "schedule") -> "FrameRateSchedule":
        try:
            data = read_json(path, "no such file (expected a frame-rate schedule JSON)")
        except ConfigError as e:
            raise ConfigError(f"{option} {e}") from None
        return cls.from_dict(data, source=f"{option} {Path(path)}")


# ------------------------------------------------------------------------------- group operations
def _check_groups(x: torch.Tensor, groups: Sequence[int], dim: int, what: str) -> None:
    if x.shape[dim] != sum(groups):
        raise ValueError(f"{what}: tensor has {x.shape[dim]} frames along dim {dim}, the schedule covers {sum(groups)}")


def merge_groups(x: torch.Tensor, groups: Sequence[int], dim: int) -> torch.Tensor:
    """Mean of each group of consecutive frames along ``dim`` (groups of 1 are copied exactly)."""
    _check_groups(x, groups, dim, "merge_groups")
    if all(g == 1 for g in groups):
        return x.clone()
    parts = torch.split(x, list(groups), dim=dim)
    return torch.cat([p if p.shape[dim] == 1 else p.mean(dim=dim, keepdim=True) for p in parts], dim=dim)


def group_starts(x: torch.Tensor, groups: Sequence[int], dim: int) -> torch.Tensor:
    """The first frame of each group along ``dim`` (the kept frames' own values, e.g. their noise)."""
    _check_groups(x, groups, dim, "group_starts")
    starts, s = [], 0
    for g in groups:
        starts.append(s)
        s += g
    return x.index_select(dim, torch.tensor(starts, device=x.device))


def resample_frames(frames: torch.Tensor, have: torch.Tensor, want: torch.Tensor, interpolator: Interpolator,
                    dim: int) -> torch.Tensor:
    """Frames at times ``want`` from frames at increasing times ``have`` along ``dim``: a time equal
    to a frame's copies it exactly; one between two frames is ``interpolator(a, b, fraction)``; one
    outside the range copies the nearest end frame."""
    if frames.shape[dim] != have.numel():
        raise ValueError(f"resample_frames: {frames.shape[dim]} frames along dim {dim}, {have.numel()} times")
    if have.numel() > 1 and not bool((have[1:] > have[:-1]).all()):
        raise ValueError("resample_frames: frame times must increase")
    x = frames.movedim(dim, 0)
    have, want = have.double().cpu(), want.double().cpu()
    hi = torch.searchsorted(have, want, right=False).clamp(max=have.numel() - 1)  # first time >= want
    lo = (hi - 1).clamp(min=0)
    exact = (have[hi] == want) | (want >= have[-1]) | (want <= have[0])
    left = torch.where(want <= have[0], torch.zeros_like(hi), torch.where(exact, hi, lo))
    out = x.index_select(0, left.to(x.device)).clone()
    between = (~exact).nonzero().flatten()
    if between.numel():
        a = x.index_select(0, lo[between].to(x.device))
        b = x.index_select(0, hi[between].to(x.device))
        w = ((want[between] - have[lo[between]]) / (have[hi[between]] - have[lo[between]])).to(x.device)
        out[between.to(x.device)] = interpolator(a, b, w).to(out.dtype)
    return out.movedim(0, dim)


def restore_frames(video: torch.Tensor, schedule: FrameRateSchedule, interpolator: Interpolator,
                   dim: int) -> torch.Tensor:
    """The decoded compact video (``schedule.pixel_frames(compact_frames)`` frames along ``dim``) at the
    original frame count, by resampling at the original pixel times."""
    want = schedule.pixel_frames(schedule.compact_frames)
    if video.shape[dim] != want:
        raise ValueError(f"restore_frames: the compact video has {video.shape[dim]} frames along dim {dim}; "
                         f"{schedule.compact_frames} compact latent frames decode to {want}")
    if schedule.is_identity:
        return video
    times = torch.arange(schedule.pixel_frames(), dtype=torch.float64)
    return resample_frames(video, schedule.compact_pixel_times(), times, interpolator, dim)


# -------------------------------------------------------------------------- flow-matching algebra
def flow_x0(before: torch.Tensor, after: torch.Tensor, sigma_before: float, sigma_after: float) -> torch.Tensor:
    """x̂0 from one Euler step of a flow-matching sampler (``after = before + (σ' − σ) v``):
    ``x̂0 = after − σ' v`` with ``v = (after − before) / (σ' − σ)``, in float32 or wider."""
    if sigma_after == sigma_before:
        raise ValueError("flow_x0: the step did not move sigma")
    dt = torch.promote_types(after.dtype, torch.float32)
    v = (after.to(dt) - before.to(dt)) / (sigma_after - sigma_before)
    return after.to(dt) - sigma_after * v


def flow_renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow-matching sample at noise level σ: ``σ ε + (1 − σ) x0``."""
    return sigma * noise.to(x0.dtype) + (1 - sigma) * x0


# ----------------------------------------------------------------------------------- the method
@dataclasses.dataclass(frozen=True)
class CompactionPlan:
    """When and how an adapter shortens the latent during one denoising run.

    step        full-length denoising steps before the compaction (>= 1: x̂0 needs one step)
    estimate    "pixels": decode x̂0 and call :meth:`FrameRateMethod.schedule` on pixel frames;
                "latents": call it on the x̂0 latent frames (no VAE); "fixed": use ``fixed``
    downsample  spatial factor x̂0 is average-pooled by before decoding for the estimate (cheaper)
    merge       "latents": :meth:`FrameRateMethod.merge` on x̂0 latents; "pixels": decode x̂0 at full
                size, merge pixel frames (``schedule.pixel_groups()``), encode again with the VAE
    fixed       a schedule to apply as is (a recorded one)
    """

    step: int
    estimate: str = "pixels"
    downsample: int = 1
    merge: str = "latents"
    fixed: FrameRateSchedule | None = None

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ConfigError(f"CompactionPlan.step must be >= 1 (x̂0 is estimated from a step), got {self.step}")
        if self.estimate not in ("pixels", "latents", "fixed") or (self.estimate == "fixed") != (self.fixed is not None):
            raise ConfigError(f"CompactionPlan.estimate must be 'pixels', 'latents' or 'fixed' (with a schedule), "
                              f"got {self.estimate!r}")
        if self.merge not in ("latents", "pixels"):
            raise ConfigError(f"CompactionPlan.merge must be 'latents' or 'pixels', got {self.merge!r}")
        if self.downsample < 1:
            raise ConfigError(f"CompactionPlan.downsample must be >= 1, got {self.downsample}")


class FrameRateMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach the diffusers frame-rate adapter."""

    @abc.abstractmethod
    def plan(self, cfg: MethodConfig, num_steps: int) -> CompactionPlan | None:
        """How to compact a run of ``num_steps`` steps; None runs the pipeline unmodified. A plan that
        cannot apply to this run is a :class:`ConfigError` naming the option."""

    @abc.abstractmethod
    def schedule(self, frames: torch.Tensor, latent_frames: int, cfg: MethodConfig, *, pixels: bool,
                 temporal_factor: int, causal_first: bool) -> FrameRateSchedule:
        """The schedule of a video of ``latent_frames`` latent frames from its frames (B, F, C, H, W):
        pixel frames in [0, 1] when ``pixels`` (F = the pixel frame count), else latent frames (F =
        ``latent_frames``). One schedule for the whole batch."""

    def merge(self, latents: torch.Tensor, schedule: FrameRateSchedule, dim: int, cfg: MethodConfig) -> torch.Tensor:
        """The compact x̂0 latent (default: the mean of each group)."""
        return merge_groups(latents, schedule.groups, dim)

    def original_position_blocks(self, num_blocks: int, cfg: MethodConfig) -> frozenset[int]:
        """Transformer blocks (DenoiserInfo order) that see the compact frames at their original
        temporal positions; the others see positions 0..T'-1 (default: none)."""
        return frozenset()

    def interpolator(self, cfg: MethodConfig) -> Interpolator:
        """The two-frame interpolator that restores merged frames (default: :func:`blend`)."""
        return blend

    def restore(self, video: torch.Tensor, schedule: FrameRateSchedule, dim: int, cfg: MethodConfig) -> torch.Tensor:
        """The decoded compact video at the original frame count (default: :func:`restore_frames`)."""
        return restore_frames(video, schedule, self.interpolator(cfg), dim)

    def cli_options(self, args: Any) -> dict[str, Any]:
        """Map the method's own ``overdrive generate`` options to config fields."""
        return {}


class VideoCodec(abc.ABC):
    """A video VAE as a frame-rate method sees it (the adapter wraps the framework's VAE).

    Latents are in the denoiser's space (normalised as the pipeline feeds them to the transformer),
    pixels are (B, C, F, H, W) in [-1, 1]; ``frame_dim`` is the latents' frame axis.
    """

    temporal_factor: int
    spatial_factor: int
    causal_first: bool
    frame_dim: int

    @abc.abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Deterministic latents (the posterior mode) of a pixel video."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pixel video of latents."""


def add_generate_arguments(p: Any) -> None:
    """The options of ``overdrive generate --method NAME`` shared by every frame-rate method: the
    pipeline and its inputs (as for calibration), the output file (safetensors with the frames and the
    schedule) and where to write the schedule JSON."""
    from .dit_cache import add_pipeline_arguments

    add_pipeline_arguments(p)
    p.add_argument("--schedule-out", type=Path, default=None, help="also write the run's schedule JSON here")

"""DLFR-VAE-style variable-frame-rate encode/decode on an existing video VAE (training-free).

What this is: a per-chunk latent frame rate chosen from the content, on the VAE a pipeline already
has. ``encode`` scores aligned chunks of the input video by how alike consecutive frames are (the
same scorer as VGDFR, :mod:`.schedule`: SSIM), lowers the frame rate of the chunks that pass (each
run of ``m`` consecutive pixel frames averaged into one, ``m`` = 2 or 4), and encodes that shorter
video with the unmodified VAE, so a merged chunk of ``4 m`` pixel frames becomes one latent frame.
``decode`` decodes the short latent with the same VAE and resamples the frames back to the original
count with an interpolator.

What it is not (DLFR-VAE, arXiv 2502.11897, released no code or weights): the paper measures content
complexity information-theoretically and adapts the pretrained VAE itself, inserting temporal down-
and upsampling inside the encoder and decoder, so each chunk is compressed at its own rate in feature
space. Here the resampling happens on pixels outside the VAE, and complexity is SSIM between
consecutive frames. A causal VAE encoding the shorter video sees merged chunks as a faster video,
which is the approximation VGDFR also makes when it re-encodes merged frames.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from overdrive.contracts.frame_rate import FrameRateSchedule, VideoCodec, merge_groups, restore_frames

from .config import VGDFRConfig
from .runtime import load_interpolator, schedule


def _config(options: Mapping[str, Any] | VGDFRConfig | None, kw: dict[str, Any]) -> VGDFRConfig:
    if isinstance(options, VGDFRConfig):
        return options.replace(**kw) if kw else options
    return VGDFRConfig.from_dict({**(options or {}), **kw}, source="DLFR-VAE options")


def schedule_video(video: torch.Tensor, codec: VideoCodec, cfg: VGDFRConfig) -> FrameRateSchedule:
    """The frame-rate schedule of a (B, C, F, H, W) pixel video in [-1, 1] (F = 1 + r (T - 1) on a causal VAE)."""
    r = codec.temporal_factor
    f = video.shape[2]
    t = (f - 1) / r + 1 if codec.causal_first else f / r
    if video.dim() != 5 or t != int(t):
        raise ValueError(f"DLFR-VAE: a (B, C, F, H, W) video with F = {'1 + ' if codec.causal_first else ''}{r} k "
                         f"frames is needed for this VAE, got {tuple(video.shape)}")
    if cfg.schedule:
        s = FrameRateSchedule.load(cfg.schedule, option="VGDFRConfig.schedule")
        if s.latent_frames != int(t):
            raise ValueError(f"VGDFRConfig.schedule covers {s.latent_frames} latent frames, the video has {int(t)}")
        return s
    if cfg.target == 1.0:
        return FrameRateSchedule.identity(int(t), temporal_factor=r, causal_first=codec.causal_first)
    frames = ((video.float() + 1) / 2).clamp(0, 1).movedim(2, 1)
    return schedule(frames, int(t), cfg, pixels=True, temporal_factor=r, causal_first=codec.causal_first)


def encode(codec: VideoCodec, video: torch.Tensor, options: Mapping[str, Any] | VGDFRConfig | None = None,
           **kw: Any) -> tuple[torch.Tensor, FrameRateSchedule]:
    """(latents with one frame per schedule group, the schedule) of a (B, C, F, H, W) video in [-1, 1].

    Options are VGDFR's schedule options (``keep_ratio`` or ``threshold``, ``max_merge``,
    ``protect_tail``, ``schedule``); keep ratio 1.0 is the VAE's own encode.
    """
    cfg = _config(options, kw)
    schedule = schedule_video(video, codec, cfg)
    short = video if schedule.is_identity else merge_groups(video, schedule.pixel_groups(), dim=2)
    latents = codec.encode(short)
    if latents.shape[codec.frame_dim] != schedule.compact_frames:
        raise RuntimeError(f"DLFR-VAE: the VAE encoded {short.shape[2]} frames into {latents.shape[codec.frame_dim]} "
                           f"latent frames, the schedule expects {schedule.compact_frames}")
    return latents, schedule


def decode(codec: VideoCodec, latents: torch.Tensor, schedule: FrameRateSchedule,
           options: Mapping[str, Any] | VGDFRConfig | None = None, **kw: Any) -> torch.Tensor:
    """The (B, C, F, H, W) video at the original frame count from variable-frame-rate latents."""
    cfg = _config(options, kw)
    if latents.shape[codec.frame_dim] != schedule.compact_frames:
        raise ValueError(f"DLFR-VAE decode: latents have {latents.shape[codec.frame_dim]} frames along dim "
                         f"{codec.frame_dim}, the schedule has {schedule.compact_frames} groups")
    video = codec.decode(latents)
    return restore_frames(video, schedule, load_interpolator(cfg.interpolator), dim=2)

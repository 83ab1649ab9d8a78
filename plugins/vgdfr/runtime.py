"""VGDFR's runtime as a frame-rate-schedule method (framework-neutral: no diffusers here).

The diffusers adapter (``overdrive.adapters.diffusers.frame_rate``) runs the pipeline's own loop and,
after ``compress_step`` steps, hands this method x̂0 (decoded to pixels, or as latents); the method
returns the schedule (:mod:`.schedule`), merges x̂0, names the blocks that keep the original
temporal positions, and restores the merged frames after decoding with its interpolator.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from overdrive.config import ConfigError
from overdrive.contracts.frame_rate import (CompactionPlan, FrameRateMethod, FrameRateSchedule, Interpolator, blend,
                                            nearest)

from .config import PAPER_BLOCKS, PAPER_ORIGINAL_BLOCKS, VGDFRConfig
from .schedule import choose, score_chunks


def original_blocks(spec: list[int] | str, num_blocks: int) -> frozenset[int]:
    """The blocks that run with original temporal positions, for a denoiser of ``num_blocks`` blocks."""
    if spec == "none":
        return frozenset()
    if spec == "all":
        return frozenset(range(num_blocks))
    if spec == "auto":
        if num_blocks == PAPER_BLOCKS:
            return frozenset(PAPER_ORIGINAL_BLOCKS)
        return frozenset(round(b * (num_blocks - 1) / (PAPER_BLOCKS - 1)) for b in PAPER_ORIGINAL_BLOCKS)
    bad = sorted(b for b in spec if b >= num_blocks)
    if bad:
        raise ConfigError(f"VGDFRConfig.original_position_blocks: blocks {bad} do not exist; the denoiser has "
                          f"{num_blocks} blocks (0..{num_blocks - 1})")
    return frozenset(spec)


def load_interpolator(name: str) -> Interpolator:
    builtin = {"blend": blend, "nearest": nearest}
    if name in builtin:
        return builtin[name]
    module, _, attr = name.partition(":")
    try:
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"VGDFRConfig.interpolator {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"VGDFRConfig.interpolator {name!r} is not callable")
    return fn


def schedule(frames: torch.Tensor, latent_frames: int, cfg: VGDFRConfig, *, pixels: bool, temporal_factor: int,
             causal_first: bool) -> FrameRateSchedule:
    """The frame-rate schedule of x̂0 (pixel or latent frames): score the chunks, pick the merges (:mod:`.schedule`)."""
    chunks = score_chunks(frames, latent_frames, pixels=pixels, temporal_factor=temporal_factor,
                          causal_first=causal_first, max_merge=cfg.max_merge, protect_tail=cfg.protect_tail)
    return choose(chunks, latent_frames, threshold=cfg.threshold, target=cfg.target,
                  temporal_factor=temporal_factor, causal_first=causal_first)


class VGDFRMethod(FrameRateMethod):
    def plan(self, cfg: VGDFRConfig, num_steps: int) -> CompactionPlan | None:
        fixed = FrameRateSchedule.load(cfg.schedule, option="VGDFRConfig.schedule") if cfg.schedule else None
        if fixed is None and cfg.target == 1.0:
            return None
        if cfg.compress_step >= num_steps:
            raise ConfigError(f"VGDFRConfig.compress_step={cfg.compress_step} must be below num_inference_steps="
                              f"{num_steps}: the compaction needs steps left to run on the shorter latent")
        return CompactionPlan(cfg.compress_step, "fixed" if fixed is not None else cfg.estimate,
                              cfg.estimate_downsample, cfg.merge, fixed)

    def schedule(self, frames: torch.Tensor, latent_frames: int, cfg: VGDFRConfig, *, pixels: bool,
                 temporal_factor: int, causal_first: bool) -> FrameRateSchedule:
        return schedule(frames, latent_frames, cfg, pixels=pixels, temporal_factor=temporal_factor,
                        causal_first=causal_first)

    def original_position_blocks(self, num_blocks: int, cfg: VGDFRConfig) -> frozenset[int]:
        return original_blocks(cfg.original_position_blocks, num_blocks)

    def interpolator(self, cfg: VGDFRConfig) -> Interpolator:
        return load_interpolator(cfg.interpolator)

    def cli_options(self, args: Any) -> dict[str, Any]:
        from .cli import options_from_args

        return options_from_args(args)

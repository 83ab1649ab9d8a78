"""Options of ``overdrive.diffusers.enable(pipe, "vgdfr", ...)`` (also the DLFR-VAE encode)."""
from __future__ import annotations

import dataclasses

from overdrive.config import ConfigError, MethodConfig

#: the HunyuanVideo blocks (20 double-stream blocks, then 40 single-stream blocks) that VGDFR runs
#: with the original temporal positions; every other block sees the compact positions 0..T'-1
PAPER_ORIGINAL_BLOCKS = (4, 19, 23, 31, 35, 36, 37, 40)
PAPER_BLOCKS = 60
DEFAULT_KEEP_RATIO = 0.75
INTERPOLATORS = ("blend", "nearest")


@dataclasses.dataclass
class VGDFRConfig(MethodConfig):
    """How VGDFR shortens the latent of one denoising run.

    keep_ratio       target fraction of latent frames (= vision tokens) kept after the compaction, in
                     (0, 1]; the similarity threshold is chosen to come closest (default 0.75 when
                     neither this nor ``threshold`` is given); 1.0 runs the pipeline unmodified
    threshold        instead of a target: merge every chunk whose similarity exceeds this, in (-1, 1]
    compress_step    full-length denoising steps before the compaction (the paper: 5 of 50)
    max_merge        latent frames merged into one at most: 2 (the paper's 2x merge of a chunk of 8
                     pixel frames) or 4 (also 4x merges of 16 pixel frames where the chunk allows)
    protect_tail     latent frames at the end never merged (the paper: the last 8 pixel frames = 2)
    estimate         "pixels": decode x̂0 and score chunks by SSIM of pixel frames (the paper);
                     "latents": score by SSIM of the x̂0 latent frames (no VAE decode)
    estimate_downsample  spatial average pooling of x̂0 before the estimate's decode (cheaper decode)
    merge            "latents": average the x̂0 latent frames of each group; "pixels": decode x̂0,
                     average pixel frames, encode again (the paper's re-encode; costs a full decode+encode)
    original_position_blocks  blocks that see the compact frames at their original temporal positions
                     (per-block RoPE): "auto" (the paper's HunyuanVideo set, mapped by relative depth on
                     other block counts), "none", "all", or a list of block indices
    interpolator     restores merged frames after decoding: "blend" (linear, flow-free), "nearest"
                     (repeat), or "package.module:function" taking (a, b, w) -> frames
    schedule         path of a recorded schedule JSON to apply instead of estimating one
    """

    VERSION = 1
    keep_ratio: float | None = None
    threshold: float | None = None
    compress_step: int = 5
    max_merge: int = 2
    protect_tail: int = 2
    estimate: str = "pixels"
    estimate_downsample: int = 2
    merge: str = "latents"
    original_position_blocks: list[int] | str = "auto"
    interpolator: str = "blend"
    schedule: str = ""

    def validate(self) -> None:
        name = type(self).__name__
        if self.keep_ratio is not None and self.threshold is not None:
            raise ConfigError(f"{name}: give keep_ratio (a target) or threshold, not both")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"{name}.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.threshold is not None and not -1 < self.threshold <= 1:
            raise ConfigError(f"{name}.threshold must be an SSIM level in (-1, 1], got {self.threshold}")
        if self.compress_step < 1:
            raise ConfigError(f"{name}.compress_step must be >= 1 (x̂0 is estimated after a full step), "
                              f"got {self.compress_step}")
        if self.max_merge not in (2, 4):
            raise ConfigError(f"{name}.max_merge must be 2 or 4, got {self.max_merge}")
        if self.protect_tail < 0:
            raise ConfigError(f"{name}.protect_tail must be >= 0, got {self.protect_tail}")
        if self.estimate not in ("pixels", "latents"):
            raise ConfigError(f"{name}.estimate must be 'pixels' or 'latents', got {self.estimate!r}")
        if self.estimate_downsample < 1:
            raise ConfigError(f"{name}.estimate_downsample must be >= 1, got {self.estimate_downsample}")
        if self.merge not in ("latents", "pixels"):
            raise ConfigError(f"{name}.merge must be 'latents' or 'pixels', got {self.merge!r}")
        blocks = self.original_position_blocks
        if isinstance(blocks, str):
            if blocks not in ("auto", "none", "all"):
                raise ConfigError(f"{name}.original_position_blocks must be 'auto', 'none', 'all' or a list of block "
                                  f"indices, got {blocks!r}")
        elif not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise ConfigError(f"{name}.original_position_blocks must list block indices >= 0, got {blocks!r}")
        if self.interpolator not in INTERPOLATORS and ":" not in self.interpolator:
            raise ConfigError(f"{name}.interpolator must be one of {list(INTERPOLATORS)} or 'package.module:function', "
                              f"got {self.interpolator!r}")

    @property
    def target(self) -> float | None:
        """The keep-ratio target in effect (None in threshold mode)."""
        if self.threshold is not None:
            return None
        return DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio

"""Options of ``overdrive.diffusers.enable(pipe, "viditq", ...)``."""
from __future__ import annotations

import dataclasses

from overdrive.config import MethodConfig


@dataclasses.dataclass
class ViDiTQConfig(MethodConfig):
    """How ViDiT-Q is attached to a pipeline.

    checkpoint  a ViDiT-Q checkpoint (the pipeline or denoiser directory written by
                ``overdrive calibrate --method viditq``) to apply to a float pipeline: its quantized
                layers replace the float ones, which are kept for ``disable()`` (exact restore, no
                memory saved). Empty: the denoiser was loaded quantized with
                ``DiffusionPipeline.from_pretrained`` (memory saved); ``enable`` then binds the
                pipeline so each run's step count is checked before its first step.
    """

    VERSION = 1
    checkpoint: str = ""

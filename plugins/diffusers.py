"""``overdrive.diffusers``: enable/disable/calibrate overdrive's DiT and frame-rate methods on a diffusers pipeline.

Importing it registers a diffusers quantizer for every DiT method whose checkpoints carry quantized
weights (ViDiT-Q), so ``DiffusionPipeline.from_pretrained(DIR)`` loads them.
"""
from overdrive.adapters.diffusers import (DENOISERS, calibrate, calibrate_command, denoiser_info, denoiser_of, disable,
                                          enable, enabled, generate_command, register_denoiser, video_codec,
                                          write_pipeline)
from overdrive.adapters.diffusers.quant import register

__all__ = ["DENOISERS", "calibrate", "calibrate_command", "denoiser_info", "denoiser_of", "disable", "enable",
           "enabled", "generate_command", "register", "register_denoiser", "video_codec", "write_pipeline"]

register()

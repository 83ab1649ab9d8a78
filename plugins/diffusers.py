"""``overdrive.diffusers``: enable/disable/calibrate overdrive's DiT methods on a diffusers pipeline.

Importing it registers a diffusers quantizer for every DiT method whose checkpoints carry quantized
weights (ViDiT-Q), so ``DiffusionPipeline.from_pretrained(DIR)`` loads them.
"""
from overdrive.adapters.diffusers import (DENOISERS, calibrate, calibrate_command, denoiser_info, denoiser_of, disable,
                                          enable, enabled, register_denoiser, write_pipeline)
from overdrive.adapters.diffusers_quant import register

__all__ = ["DENOISERS", "calibrate", "calibrate_command", "denoiser_info", "denoiser_of", "disable", "enable",
           "enabled", "register", "register_denoiser", "write_pipeline"]

register()

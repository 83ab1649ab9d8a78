"""``overdrive.diffusers``: enable/disable/calibrate overdrive's DiT and frame-rate methods on a diffusers pipeline."""
from overdrive.adapters.diffusers import (DENOISERS, calibrate, calibrate_command, denoiser_info, denoiser_of, disable,
                                          enable, enabled, generate_command, register_denoiser, video_codec)

__all__ = ["DENOISERS", "calibrate", "calibrate_command", "denoiser_info", "denoiser_of", "disable", "enable",
           "enabled", "generate_command", "register_denoiser", "video_codec"]

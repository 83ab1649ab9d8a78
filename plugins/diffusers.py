"""``overdrive.diffusers``: enable/disable/calibrate overdrive's DiT methods on a diffusers pipeline."""
from overdrive.adapters.diffusers import (DENOISERS, calibrate, calibrate_command, denoiser_info, denoiser_of, disable,
                                          enable, enabled, register_denoiser)

__all__ = ["DENOISERS", "calibrate", "calibrate_command", "denoiser_info", "denoiser_of", "disable", "enable",
           "enabled", "register_denoiser"]

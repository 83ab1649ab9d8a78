"""``overdrive.diffusers``: enable/disable overdrive's DiT methods on a diffusers pipeline."""
from overdrive.adapters.diffusers import DENOISERS, denoiser_info, denoiser_of, disable, enable, enabled, register_denoiser

__all__ = ["DENOISERS", "denoiser_info", "denoiser_of", "disable", "enable", "enabled", "register_denoiser"]

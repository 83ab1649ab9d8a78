"""The VGDFR method object (``METHOD``) the frame-rate integration of the diffusers adapter calls."""
from __future__ import annotations

from .runtime import VGDFRMethod

METHOD = VGDFRMethod()

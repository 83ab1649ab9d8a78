"""The FrameFusion method object (``METHOD``) the token-reduction adapters call."""
from __future__ import annotations

from .runtime import FrameFusion

METHOD = FrameFusion()

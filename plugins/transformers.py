"""``overdrive.transformers``: helpers for transformers models (see overdrive.adapters.transformers)."""
from overdrive.adapters.transformers import *  # noqa: F401,F403

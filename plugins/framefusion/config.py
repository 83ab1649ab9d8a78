"""FrameFusion options (``--additional-config '{"framefusion": {...}}'``, ``overdrive.transformers.enable``)."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from overdrive.config import ConfigError, MethodConfig

#: similarity threshold per model family when the option is left unset (the paper's defaults:
#: 0.5 for the Qwen2-VL family, 0.6 for LLaVA-Video / LLaVA-OneVision)
FAMILY_SIMILARITY = {"qwen2_vl": 0.5, "llava_onevision": 0.6}
DEFAULT_SIMILARITY = 0.6

#: query-agnostic importance proxies for the before-the-decoder version (see docs/methods/framefusion.md)
PROXIES = ("deviation", "norm")


@dataclasses.dataclass
class FrameFusionConfig(MethodConfig):
    """FrameFusion: merge vision tokens repeated across adjacent frames, then prune unimportant ones.

    cost                    target average fraction of vision-token compute over the decoder's
                            layers, in (0, 1]; 1 = no reduction. Before the decoder (vLLM) every
                            layer sees the same tokens, so it is the fraction of video tokens kept.
    similarity_lower_bound  cosine similarity at or above which a token merges into the previous
                            token at the same spatial position; null = the model family's default
                            (0.5 Qwen2-VL family, 0.6 LLaVA-OneVision/LLaVA-Video)
    ratio_lower_bound       merging repeats layer by layer until a layer merges fewer than this
                            fraction of the remaining vision tokens; then one pruning step follows
    importance              before-the-decoder pruning score (no text query there, see docs):
                            "deviation" (distance of the RMS-normalised embedding from the video's
                            mean) or "norm" (embedding L2 norm). The per-layer version always uses
                            the last query token's attention, as the paper.
    weight_merged           before the decoder: multiply a token's importance by the number of
                            original tokens it stands for after merging (the attention mass its
                            duplicates would have drawn together), so a merged still background is
                            not pruned as if it were one token
    """

    VERSION = 1
    cost: float = 0.3
    similarity_lower_bound: float | None = None
    ratio_lower_bound: float = 0.1
    importance: Literal["deviation", "norm"] = "deviation"
    weight_merged: bool = True

    def validate(self) -> None:
        if not (math.isfinite(self.cost) and 0.0 < self.cost <= 1.0):
            raise ConfigError(f"FrameFusionConfig.cost must be in (0, 1] (fraction of vision-token compute "
                              f"kept), got {self.cost!r}")
        s = self.similarity_lower_bound
        if s is not None and not (math.isfinite(s) and 0.0 <= s <= 1.0):
            raise ConfigError(f"FrameFusionConfig.similarity_lower_bound must be a cosine similarity in "
                              f"[0, 1] (or null for the model family's default), got {s!r}")
        r = self.ratio_lower_bound
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ConfigError(f"FrameFusionConfig.ratio_lower_bound must be in [0, 1], got {r!r}")

    def similarity_for(self, family: str) -> float:
        if self.similarity_lower_bound is not None:
            return self.similarity_lower_bound
        return FAMILY_SIMILARITY.get(family, DEFAULT_SIMILARITY)

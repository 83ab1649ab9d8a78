"""Options of ``overdrive.diffusers.enable(pipe, "ditfastattn", ...)``."""
from __future__ import annotations

import dataclasses

from overdrive.config import ConfigError, MethodConfig

from .plan import ARROW_KS, V1_METHODS

STRATEGIES = ("",) + V1_METHODS + ("arrow",)


@dataclasses.dataclass
class DiTFastAttnConfig(MethodConfig):
    """How DiTFastAttn runs on a pipeline.

    plan            path to a calibrated plan JSON (``overdrive calibrate --method ditfastattn``): the
                    normal way to run, one method per block (v1) or per head (v2) per step
    strategy        without a plan: one method everywhere from step ``warmup`` on — "full", "ast",
                    "asc", "wars", "wars+asc" (v1) or "arrow" (v2 arrow attention for every head)
    window_fraction v1 WA-RS band half-width as a fraction of the vision tokens (paper: N/8)
    arrow_k         v2 arrow band divisor without a plan: half-width ceil(N_vis / (2k)), k in 8/16/32
    warmup          steps computed in full before a plan-less ``strategy`` applies (>= 1: reuse needs a
                    computed step)
    """

    VERSION = 1
    plan: str = ""
    strategy: str = ""
    window_fraction: float = 0.125
    arrow_k: int = 8
    warmup: int = 1

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"DiTFastAttnConfig.strategy must be one of {list(STRATEGIES[1:])} (or empty with a plan), "
                              f"got {self.strategy!r}")
        if self.plan and self.strategy:
            raise ConfigError("DiTFastAttnConfig: give either plan (a calibrated plan file) or strategy, not both")
        if not self.plan and not self.strategy:
            raise ConfigError("DiTFastAttnConfig: give plan=PATH (from `overdrive calibrate --method ditfastattn`) "
                              "or strategy=one of " + ", ".join(STRATEGIES[1:]))
        if not 0 < self.window_fraction < 1:
            raise ConfigError(f"DiTFastAttnConfig.window_fraction must be in (0, 1), got {self.window_fraction}")
        if self.arrow_k not in ARROW_KS:
            raise ConfigError(f"DiTFastAttnConfig.arrow_k must be one of {list(ARROW_KS)}, got {self.arrow_k}")
        if self.warmup < 1:
            raise ConfigError(f"DiTFastAttnConfig.warmup must be >= 1 (step 0 has nothing to reuse), got {self.warmup}")

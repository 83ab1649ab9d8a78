"""The DiTFastAttn method object (``METHOD``): the hook-layer contract, calibration on request."""
from __future__ import annotations

from typing import Any

from overdrive.contracts.dit_cache import CalibrationRun, DenoiserSession, DiTCacheMethod

from .config import V1_DEFAULT_THRESHOLD, V2_DEFAULT_ALPHA, DiTFastAttnConfig, Plan
from .runtime import DiTFastAttnHooks


class DiTFastAttnMethod(DiTCacheMethod):
    def hooks(self, session: DenoiserSession, cfg: DiTFastAttnConfig) -> DiTFastAttnHooks:
        return DiTFastAttnHooks(session, cfg)

    def calibrate(self, run: CalibrationRun, variant: str = "v1", threshold: float = V1_DEFAULT_THRESHOLD,
                  alpha: float = V2_DEFAULT_ALPHA, window_fraction: float = 0.125) -> Plan:
        """v1 (per block, ``threshold``) or v2 (per head, ``alpha``) plan search; see :mod:`.calibrate`."""
        from .calibrate import calibrate

        return calibrate(run, variant=variant, threshold=threshold, alpha=alpha, window_fraction=window_fraction)

    def calibration_options(self, args: Any) -> dict[str, Any]:
        return dict(variant=args.variant, threshold=args.threshold, alpha=args.alpha,
                    window_fraction=args.window_fraction)


METHOD = DiTFastAttnMethod()

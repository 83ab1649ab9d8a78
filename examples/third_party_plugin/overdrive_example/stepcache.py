"""Step reuse for DiT denoisers: a whole DiT method in one file, on overdrive's diffusers hook layer.

The denoiser is computed at the first ``warmup`` steps of a denoising run and then at every
``interval``-th step; in between, its previous output is returned. The hook layer says which CFG
branch (the pipelines' ``"cond"``/``"uncond"`` calls, or one batched call) and which step of which
run each denoiser call is, so this method only decides and remembers — it imports no diffusers.
"""
from __future__ import annotations

from typing import Any

from overdrive.contracts import DenoiserSession, DiTCacheMethod, DiTHooks, ModuleCall, StepContext

from .configs import StepCacheConfig


class StepCacheHooks(DiTHooks):
    def __init__(self, session: DenoiserSession, cfg: StepCacheConfig) -> None:
        super().__init__(session)
        self.cfg = cfg
        self.outputs: dict[str, Any] = {}      # branch -> last computed denoiser output
        self._computed: dict[str, int] = {}    # evaluations since attach, per branch (survives runs)

    @property
    def computed(self) -> dict[str, int]:
        """Denoiser evaluations actually computed since attach, per CFG branch."""
        return dict(self._computed)

    def denoiser_call(self, step: StepContext, call: ModuleCall) -> Any:
        if step.new_run:
            self.outputs.pop(step.branch, None)
        i, warmup = step.step, self.cfg.warmup
        if step.branch not in self.outputs or i < warmup or (i - warmup) % self.cfg.interval == 0:
            self.outputs[step.branch] = call.run()
            self._computed[step.branch] = self._computed.get(step.branch, 0) + 1
        return self.outputs[step.branch]

    def reset_caches(self) -> None:
        self.outputs.clear()


class StepCacheMethod(DiTCacheMethod):
    def hooks(self, session: DenoiserSession, cfg: StepCacheConfig) -> StepCacheHooks:
        return StepCacheHooks(session, cfg)


METHOD = StepCacheMethod()

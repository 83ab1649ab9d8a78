"""Step reuse for DiT denoisers through diffusers' official ``ModelHook`` API.

The denoiser is recomputed on the first ``warmup`` calls of a denoising run and then on every
``interval``-th call; in between, its previous output is returned. State is kept per cache context
(the pipelines' ``"cond"``/``"uncond"`` branches) inside the hook instance; a new run is detected when
the timestep goes up again.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from overdrive.contracts import DenoiserInfo, DiTCacheMethod

from .configs import StepCacheConfig

HOOK_NAME = "overdrive_example_stepcache"


class _State(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.calls = 0
        self.last_t: float | None = None
        self.output: Any = None


def _timestep(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep")
    if isinstance(t, torch.Tensor) and t.numel():
        return float(t.flatten()[0])
    return float(t) if isinstance(t, (int, float)) else None


class StepCacheHook(ModelHook):
    _is_stateful = True

    def __init__(self, cfg: StepCacheConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.state_manager = StateManager(_State)
        self.computed: dict[str, int] = {}  # evaluations since attach, per context (survives resets)

    def _state(self) -> _State:
        if self.state_manager._context is None:  # called outside a pipeline's cache_context
            self.state_manager.set_context(_DEFAULT_CONTEXT)
        return self.state_manager.get_state()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self._state()
        t = _timestep(args, kwargs)
        if st.last_t is not None and t is not None and t > st.last_t:
            st.reset()  # timesteps go down within a run: going up means a new run
        st.last_t = t
        i = st.calls
        st.calls += 1
        if st.output is None or i < self.cfg.warmup or (i - self.cfg.warmup) % self.cfg.interval == 0:
            st.output = self.fn_ref.original_forward(*args, **kwargs)
            name = self.state_manager.context.name
            self.computed[name] = self.computed.get(name, 0) + 1
        return st.output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class _Attachment:
    def __init__(self, module: torch.nn.Module, hook: StepCacheHook) -> None:
        self.module, self.hook = module, hook

    @property
    def computed(self) -> dict[str, int]:
        """Denoiser evaluations actually computed since attach, per cache context."""
        return dict(self.hook.computed)

    def detach(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.module).remove_hook(HOOK_NAME, recurse=False)


class StepCacheMethod(DiTCacheMethod):
    def attach(self, denoiser: torch.nn.Module, cfg: StepCacheConfig, info: DenoiserInfo) -> _Attachment:
        hook = StepCacheHook(cfg)
        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(hook, HOOK_NAME)
        return _Attachment(denoiser, hook)


_DEFAULT_CONTEXT = CacheContext("default")
METHOD = StepCacheMethod()

"""The diffusers hook layer: one implementation of everything a DiT method needs from diffusers.

Methods implement :class:`overdrive.contracts.dit_cache.DiTHooks` (framework-neutral callbacks);
:class:`Session` installs diffusers ``ModelHook``s on the instances that need them and calls back:

* **denoiser** (always): a stateful hook that reads the pipeline's ``cache_context`` and turns each
  call into a :class:`StepContext` by one rule (:class:`StepTracker`), then calls
  ``hooks.denoiser_call``. ``reset_state`` (diffusers calls it at the end of every pipeline call)
  ends every run;
* **blocks** (when ``block_call`` is overridden): ``hooks.block_call(step, i, call)``;
* **attention modules** (when ``attention_call`` or ``attention`` is overridden):
  ``hooks.attention_call(step, i, call)``; running the call runs the module's own processor
  (projections, norms, rotary untouched) with ``F.scaled_dot_product_attention`` intercepted by a
  ``TorchFunctionMode`` scoped to that one module call and routed to ``hooks.attention(step, i, op)``.

Nothing is patched on classes or processors. ``detach()`` removes the hooks and the attributes the
hook registry added, so the model is exactly as before (parameters, hooks, processors, attributes,
outputs). Private diffusers symbols used here (and only here) are listed in docs/ledger.md.
"""
from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.overrides import TorchFunctionMode

from overdrive.config import ConfigError
from overdrive.contracts.dit_cache import (AttentionOp, DenoiserInfo, DiTHooks, H, ModuleCall, RecordedCall,
                                           StepContext)

DEFAULT_BRANCH = "default"
_HOOK = {"denoiser": "overdrive_denoiser", "block": "overdrive_block", "attention": "overdrive_attention"}


# ----------------------------------------------------------------------------------- step tracking
@dataclasses.dataclass
class _Branch:
    step: int
    timestep: float | None
    num_steps: int | None


class StepTracker:
    """The one rule for runs and steps, per CFG branch (cache-context name).

    * With a ``step_index`` in the pipeline's cache context (Wan, ...): that is the step; a run
      starts at step_index 0.
    * Without one (Flux, SD3, PixArt, CogVideoX, direct calls): each call of a branch is the next
      step; a run starts when the timestep does not go down (timesteps fall within a run).
    * A branch's first call after :meth:`clear` starts a run; diffusers ends every run at the end of
      each pipeline call (``reset_state``), so consecutive pipeline calls never share a run.
    """

    def __init__(self) -> None:
        self.branches: dict[str, _Branch] = {}

    def clear(self) -> None:
        self.branches.clear()

    def advance(self, branch: str, step_index: int | None, timestep: float | None,
                num_steps: Callable[[], int | None]) -> tuple[int, bool, int | None]:
        """(step, new_run, num_steps) of the next call of ``branch``."""
        prev = self.branches.get(branch)
        if step_index is not None:
            new = prev is None or step_index == 0
            step = step_index
        else:
            new = prev is None or (timestep is not None and prev.timestep is not None and timestep >= prev.timestep)
            step = 0 if new else prev.step + 1
        n = num_steps() if new or prev is None else prev.num_steps
        self.branches[branch] = _Branch(step, timestep, n)
        return step, new, n

    def sync(self, step: StepContext) -> None:
        """Continue from ``step`` (a replayed call's recorded context)."""
        self.branches[step.branch] = _Branch(step.step, step.timestep, step.num_steps)


def _timestep(kwargs: dict) -> float | None:
    t = kwargs.get("timestep")
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return float(t) if isinstance(t, (int, float)) else None


def _hidden(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("hidden_states", args[0] if args else None)


def main_output(out: Any) -> torch.Tensor:
    """The denoiser's prediction tensor from whatever it returned (tensor, tuple or output dataclass)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the prediction tensor in a denoiser output of type {type(out).__name__}")


# ------------------------------------------------------------------------------ diffusers hooks
class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _DenoiserHook(ModelHook):
    # diffusers hands the cache context (model.cache_context(...)) and the end-of-pipeline reset only
    # to hooks flagged stateful; ModelHook has no public way to say so (docs/ledger.md)
    _is_stateful = True

    def __init__(self, session: "Session") -> None:
        super().__init__()
        self.session = session
        self.state_manager = StateManager(_NoState)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            context = self.state_manager.context
        except ValueError:  # called outside a pipeline's cache_context
            context = None
        return self.session._denoiser_call(context, self.fn_ref.original_forward, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.session.reset()
        return module


class _ModuleHook(ModelHook):
    def __init__(self, call: Callable[[int, Callable, tuple, dict], Any], index: int) -> None:
        super().__init__()
        self.call, self.index = call, index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.index, self.fn_ref.original_forward, args, kwargs)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _Intercept(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls made inside it to ``handler(args)``."""

    def __init__(self, handler: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        super().__init__()
        self.handler, self.hits = handler, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.hits += 1
            a = dict(zip(_SDPA_ARGS, args))
            a.update(kwargs)
            return self.handler(a)
        return func(*args, **kwargs)


def _overrides(hooks: DiTHooks, name: str) -> bool:
    return getattr(type(hooks), name) is not getattr(DiTHooks, name)


# ------------------------------------------------------------------------------------- session
class Session:
    """One method's hooks on one denoiser (:class:`~overdrive.contracts.dit_cache.DenoiserSession`)."""

    def __init__(self, method: str, model: torch.nn.Module, info: DenoiserInfo, pipeline: Any = None) -> None:
        if session_of(model) is not None:
            other = session_of(model).method
            raise RuntimeError(f"{other!r} is already enabled on this pipeline; call "
                               "overdrive.diffusers.disable(pipe) first")
        self.method, self.module, self.info = method, model, info
        self.architecture = type(model).__name__
        self.blocks = info.blocks(model)
        if not self.blocks:
            raise TypeError(f"{self.architecture}: DenoiserInfo.block_lists {info.block_lists} name no blocks")
        self.attention_modules = [getattr(b, info.attention) for b in self.blocks]
        first = self.attention_modules[0]
        self.heads = int(first.heads)
        self.head_dim = int(getattr(first, "head_dim", None) or first.inner_dim // first.heads)
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.tracker = StepTracker()
        self.hooks: DiTHooks | None = None
        self._current: StepContext | None = None
        self._forced: StepContext | None = None
        self._wants_op = False
        self.cache_context: Any = None  # diffusers' CacheContext of the denoiser call in progress
        self._installed: list[tuple[torch.nn.Module, str, bool, bool]] = []
        self.loaded = False  # attached by a quantizer while from_pretrained loaded the denoiser

    # -- DenoiserSession --------------------------------------------------------------------------
    @property
    def current(self) -> StepContext | None:
        return self._current

    @property
    def attached(self) -> bool:
        return bool(self._installed)

    def reset(self) -> None:
        self.tracker.clear()
        if self.hooks is not None:
            self.hooks.reset_caches()

    def install(self, hooks: H) -> H:
        """Hook the levels ``hooks`` overrides (the denoiser always); on an error nothing stays attached."""
        if self.hooks is not None:
            raise RuntimeError("a session installs one set of hooks")
        self.hooks = hooks
        try:
            self._add(self.module, "denoiser", _DenoiserHook(self))
            if _overrides(hooks, "block_call"):
                for i, b in enumerate(self.blocks):
                    self._add(b, "block", _ModuleHook(self._block_call, i))
            if _overrides(hooks, "attention_call") or _overrides(hooks, "attention"):
                self._wants_op = _overrides(hooks, "attention")
                for i, m in enumerate(self.attention_modules):
                    self._add(m, "attention", _ModuleHook(self._attention_call, i))
        except BaseException:
            self.detach()
            raise
        self._invalidate()
        return hooks

    @property
    def pipeline(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

    def detach(self) -> None:
        if self._installed and self.hooks is not None:
            self.hooks.detached()
        for module, role, had_registry, had_forward in reversed(self._installed):
            registry = module._diffusers_hook
            registry.remove_hook(_HOOK[role], recurse=False)
            if not registry.hooks:
                # HookRegistry.remove_hook leaves the registry and an instance-level `forward` behind
                if not had_forward:
                    module.__dict__.pop("forward", None)
                if not had_registry:
                    del module._diffusers_hook
        self._installed.clear()
        self.tracker.clear()
        self._invalidate()

    def _add(self, module: torch.nn.Module, role: str, hook: ModelHook) -> None:
        had_registry, had_forward = "_diffusers_hook" in vars(module), "forward" in vars(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _HOOK[role])
        self._installed.append((module, role, had_registry, had_forward))

    def _invalidate(self) -> None:
        registry = getattr(self.module, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()

    # -- calls ------------------------------------------------------------------------------------
    def _num_steps(self, context: Any) -> int | None:
        n = getattr(context, "num_inference_steps", None)
        pipe = self._pipeline() if self._pipeline is not None else None
        if n is None and pipe is not None:
            ts = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
            n = len(ts) if ts is not None else None
        return n

    def _step(self, context: Any, args: tuple, kwargs: dict) -> StepContext:
        if self._forced is not None:
            step, self._forced = self._forced, None
            self.tracker.sync(step)
            return step
        branch = context.name if context is not None else DEFAULT_BRANCH
        t = _timestep(kwargs)
        index, new, n = self.tracker.advance(branch, getattr(context, "step_index", None), t,
                                             lambda: self._num_steps(context))
        hidden = _hidden(args, kwargs)
        b = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() else 0
        batched = bool(b and b % 2 == 0 and torch.equal(hidden[: b // 2], hidden[b // 2:]))
        text: int | None = 0
        if self.info.joint_text:
            enc = kwargs.get("encoder_hidden_states")
            text = enc.shape[1] if isinstance(enc, torch.Tensor) else None
        return StepContext(branch, index, new, t, n, b, batched, text)

    def _denoiser_call(self, context: Any, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step = self._step(context, args, kwargs)
        outer = self._current, self.cache_context
        self._current, self.cache_context = step, context
        try:
            return self.hooks.denoiser_call(step, ModuleCall(args, kwargs, forward))
        finally:
            self._current, self.cache_context = outer

    def _block_call(self, index: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step = self._current
        if step is None:  # the block was called outside a denoiser call
            return forward(*args, **kwargs)
        return self.hooks.block_call(step, index, ModuleCall(args, kwargs, forward))

    def _attention_call(self, index: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step = self._current
        if step is None:
            return forward(*args, **kwargs)
        if not self._wants_op:
            return self.hooks.attention_call(step, index, ModuleCall(args, kwargs, forward))

        def handler(a: dict[str, Any]) -> torch.Tensor:
            q = a["query"]
            op = AttentionOp(q, a["key"], a["value"], a.get("attn_mask"), a.get("dropout_p", 0.0),
                             bool(a.get("is_causal", False)), a.get("scale"), bool(a.get("enable_gqa", False)),
                             self.info.text_span(q.shape[-2], step.text_tokens))
            return self.hooks.attention(step, index, op)

        def run(*a: Any, **kw: Any) -> Any:
            mode = _Intercept(handler)
            with mode:
                out = forward(*a, **kw)
            if mode.hits != 1:
                m = self.attention_modules[index]
                raise RuntimeError(
                    f"{self.method}: attention module {index} ({type(m).__name__}) made {mode.hits} calls to "
                    "scaled_dot_product_attention; the method needs diffusers' native attention backend (one SDPA "
                    "call per attention module). Reset other attention backends with "
                    "transformer.reset_attention_backend().")
            return out

        return self.hooks.attention_call(step, index, ModuleCall(args, kwargs, run))


def session_of(model: torch.nn.Module) -> Session | None:
    """The overdrive session attached to ``model`` (found through its denoiser hook: no global state)."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(_HOOK["denoiser"]) if registry is not None else None
    return hook.session if isinstance(hook, _DenoiserHook) else None


def replay(model: torch.nn.Module, call: RecordedCall) -> torch.Tensor:
    """Run ``model`` on a recorded call in its recorded cache context; an attached session takes the
    recorded step context as is (no new-run or step inference). Returns the prediction tensor."""
    session = session_of(model)
    ctx = call.replay_context
    if session is not None:
        session._forced = call.step
    try:
        with torch.no_grad():
            if ctx is not None:
                fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name != "name"}
                with model.cache_context(ctx.name, **fields):
                    out = model(*call.args, **call.kwargs)
            else:
                out = model(*call.args, **call.kwargs)
    finally:
        if session is not None:
            session._forced = None
    return main_output(out)


# --------------------------------------------------------------------------------- calibration
def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


class _Recorder(DiTHooks):
    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.calls: list[RecordedCall] = []

    def denoiser_call(self, step: StepContext, call: ModuleCall) -> Any:
        rec = RecordedCall(step, _clone(call.args), _clone(call.kwargs), torch.empty(0), self.session.cache_context)
        self.calls.append(rec)
        out = call.run()
        rec.output = main_output(out).detach().clone()
        return out


class PipelineCalibration:
    """:class:`~overdrive.contracts.dit_cache.CalibrationRun` on one pipeline call."""

    def __init__(self, method: str, pipeline: Any, model: torch.nn.Module, info: DenoiserInfo,
                 call_kwargs: dict[str, Any]) -> None:
        self.method, self.pipeline, self.module, self.info = method, pipeline, model, info
        self.architecture = type(model).__name__
        self.call_kwargs = call_kwargs
        self._sessions: list[Session] = []

    def record(self) -> list[list[RecordedCall]]:
        session = Session(self.method, self.module, self.info, self.pipeline)
        rec = session.install(_Recorder(session))
        try:
            with torch.no_grad():
                self.pipeline(**self.call_kwargs)
        finally:
            session.detach()
        steps: list[list[RecordedCall]] = []
        for c in rec.calls:
            if not steps or steps[-1][-1].step.step != c.step.step:
                steps.append([])
            steps[-1].append(c)
        if not steps:
            raise ConfigError(f"{type(self.pipeline).__name__}: the pipeline made no denoiser calls")
        return steps

    def attach(self, make_hooks: Callable[[Session], H]) -> H:
        session = Session(self.method, self.module, self.info, self.pipeline)
        self._sessions.append(session)
        return session.install(make_hooks(session))

    def replay(self, calls: Sequence[RecordedCall]) -> list[torch.Tensor]:
        return [replay(self.module, c) for c in calls]

    def denoiser_writer(self) -> Callable[..., Path]:
        model = self.module
        return lambda path, tensors, quantization_config, replaced: write_denoiser(
            model, path, tensors, quantization_config, replaced)

    def close(self) -> None:
        for s in self._sessions:
            s.detach()
        self._sessions.clear()


# ------------------------------------------------------------------------- denoiser checkpoints
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' single-file weights name


def write_denoiser(model: torch.nn.Module, path: Any, tensors: Mapping[str, torch.Tensor],
                   quantization_config: Mapping[str, Any], replaced: Sequence[str]) -> Path:
    """Write ``model`` as a diffusers model directory (config.json + safetensors), atomically: the
    tensors of the modules in ``replaced`` are dropped, ``tensors`` added, and ``quantization_config``
    goes into config.json (``from_pretrained`` then picks the registered quantizer)."""
    from safetensors.torch import save_file

    from overdrive.checkpoint import atomic_directory

    prefixes = tuple(f"{r}." for r in replaced)
    out = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    clash = sorted(set(out) & set(tensors))
    if clash:
        raise ValueError(f"write_denoiser: tensors {clash[:3]} are both kept and replaced")
    out.update({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    config = json.loads(model.to_json_string())
    config["quantization_config"] = dict(quantization_config)
    with atomic_directory(Path(path)) as tmp:
        save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(path)

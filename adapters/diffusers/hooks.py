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

Several methods can be installed on one denoiser (``overdrive.diffusers.enable`` twice): at each level
they chain, the first installed outermost, each ``call.run()`` / ``op.compute()`` reaching the next.
Video denoisers get per-block temporal positions (``run_at_frames``): the denoiser's own rotary module
is run for the original frame count and the rows of the given frames are passed to that block.

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
_LEVELS = ("denoiser_call", "block_call", "attention_call", "attention")


class Session:
    """The methods' hooks on one denoiser (:class:`~overdrive.contracts.dit_cache.DenoiserSession`).

    Several methods may be installed (:meth:`install`, one per method name); at every level the
    first installed is the outermost: its ``call.run()`` runs the next method's callback, the last
    one's runs the module. A level is hooked once any installed method overrides its callback.
    """

    def __init__(self, method: str, model: torch.nn.Module, info: DenoiserInfo, pipeline: Any = None) -> None:
        if session_of(model) is not None:
            other = session_of(model).method
            raise RuntimeError(f"{other!r} is already enabled on this pipeline; call "
                               "overdrive.diffusers.disable(pipe) first")
        self.first_method, self.module, self.info = method, model, info
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
        self.stack: list[tuple[str, DiTHooks]] = []
        self._chains: dict[str, list[DiTHooks]] = {level: [] for level in _LEVELS}
        self._current: StepContext | None = None
        self._forced: StepContext | None = None
        self._hidden: torch.Tensor | None = None  # latent input of the denoiser call in progress
        self._rotary: dict[tuple, Any] = {}         # per-frame-position rotary tables of that call
        self.cache_context: Any = None  # diffusers' CacheContext of the denoiser call in progress
        self._installed: list[tuple[torch.nn.Module, str, bool, bool]] = []
        self.loaded = False  # attached by a quantizer while from_pretrained loaded the denoiser

    # -- DenoiserSession --------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The installed methods' names, outermost first, joined by '+'."""
        return "+".join(name for name, _ in self.stack) or self.first_method

    @property
    def methods(self) -> list[str]:
        return [name for name, _ in self.stack]

    @property
    def hooks(self) -> DiTHooks | None:
        """The outermost method's hooks (the only one when a single method is enabled)."""
        return self.stack[0][1] if self.stack else None

    @property
    def current(self) -> StepContext | None:
        return self._current

    @property
    def attached(self) -> bool:
        return bool(self._installed)

    def reset(self) -> None:
        self.tracker.clear()
        for _, hooks in self.stack:
            hooks.reset_caches()

    def invalidate(self) -> None:
        for _, hooks in self.stack:
            hooks.reset_caches()

    def install(self, hooks: H, method: str | None = None) -> H:
        """Add ``hooks`` (innermost) and hook the levels it overrides (the denoiser always); on an
        error nothing of it stays attached."""
        name = method or self.first_method
        if any(h is hooks for _, h in self.stack):
            raise RuntimeError("these hooks are already installed")
        if name in self.methods:
            raise RuntimeError(f"{name!r} is already enabled on this pipeline; call overdrive.diffusers.disable(pipe) "
                               "first")
        before = len(self._installed)
        self.stack.append((name, hooks))
        try:
            if not self._has("denoiser"):
                self._add(self.module, "denoiser", _DenoiserHook(self))
            if _overrides(hooks, "block_call") and not self._has("block"):
                for i, b in enumerate(self.blocks):
                    self._add(b, "block", _ModuleHook(self._block_call, i))
            if (_overrides(hooks, "attention_call") or _overrides(hooks, "attention")) and not self._has("attention"):
                for i, m in enumerate(self.attention_modules):
                    self._add(m, "attention", _ModuleHook(self._attention_call, i))
        except BaseException:
            self.stack.pop()
            self._remove_installed(before)
            if not self.stack:
                self.detach()
            raise
        self._rechain()
        self._invalidate()
        return hooks

    @property
    def pipeline(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

    def remove(self, hooks: DiTHooks) -> None:
        """Take one method's ``hooks`` off (its ``detached()`` is called); the last one detaches all."""
        self.stack = [(n, h) for n, h in self.stack if h is not hooks]
        if not self.stack:
            self.detach()
        else:
            self._rechain()
        hooks.detached()

    def detach(self) -> None:
        """Remove every hook the layer installed, then let each method undo what it changed on the
        model itself (``DiTHooks.detached``)."""
        removed = [h for _, h in self.stack] if self._installed else []
        self._remove_installed(0)
        self.stack.clear()
        self._rechain()
        self.tracker.clear()
        self._invalidate()
        for hooks in removed:
            hooks.detached()

    def _rechain(self) -> None:
        self._chains = {level: [h for _, h in self.stack if _overrides(h, level)] for level in _LEVELS}

    def _has(self, role: str) -> bool:
        return any(r == role for _, r, _, _ in self._installed)

    def _remove_installed(self, keep: int) -> None:
        while len(self._installed) > keep:
            module, role, had_registry, had_forward = self._installed.pop()
            registry = module._diffusers_hook
            registry.remove_hook(_HOOK[role], recurse=False)
            if not registry.hooks:
                # HookRegistry.remove_hook leaves the registry and an instance-level `forward` behind
                if not had_forward:
                    module.__dict__.pop("forward", None)
                if not had_registry:
                    del module._diffusers_hook

    def _add(self, module: torch.nn.Module, role: str, hook: ModelHook) -> None:
        had_registry, had_forward = "_diffusers_hook" in vars(module), "forward" in vars(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _HOOK[role])
        self._installed.append((module, role, had_registry, had_forward))

    def _invalidate(self) -> None:
        registry = getattr(self.module, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()

    # -- per-block frame positions ----------------------------------------------------------------
    def run_at_frames(self, call: ModuleCall, positions: Sequence[int]) -> Any:
        rot = self.info.rotary
        if rot is None or self.info.frame_dim is None:
            raise TypeError(f"{self.architecture}: per-block frame positions need rotary metadata "
                            "(DenoiserInfo.rotary and frame_dim; overdrive.diffusers.register_denoiser)")
        table = self._rotary_at(tuple(int(p) for p in positions))
        args, kwargs = list(call.args), dict(call.kwargs)
        name = next((n for n in rot.block_names if n in kwargs), None)
        if name is not None:
            kwargs[name] = table
        elif len(args) > rot.block_arg:
            args[rot.block_arg] = table
        else:
            raise TypeError(f"{self.architecture}: a block was called without its rotary embedding (argument "
                            f"{rot.block_arg} or {'/'.join(rot.block_names)})")
        return call.run_with(*args, **kwargs)

    def _rotary_at(self, positions: tuple[int, ...]) -> Any:
        hidden = self._hidden
        if hidden is None:
            raise RuntimeError("run_at_frames is for block calls inside a denoiser call")
        fd = self.info.frame_dim
        if len(positions) != hidden.shape[fd]:
            raise ValueError(f"run_at_frames: {len(positions)} positions for a latent of {hidden.shape[fd]} frames")
        key = (positions, tuple(hidden.shape))
        if key not in self._rotary:
            rot = self.info.rotary
            total = max(positions) + 1
            shape = list(hidden.shape)
            shape[0], shape[fd] = 1, total
            full = getattr(self.module, rot.module)(hidden.new_empty(shape))
            index = torch.tensor(positions)

            def pick(t: torch.Tensor) -> torch.Tensor:
                n = t.shape[rot.token_dim]
                if n % total:
                    raise ValueError(f"{self.architecture}: rotary tokens {n} are not frame-major over {total} frames")
                per = t.reshape(*t.shape[:rot.token_dim], total, n // total, *t.shape[rot.token_dim + 1:])
                per = per.index_select(rot.token_dim, index.to(t.device))
                return per.reshape(*t.shape[:rot.token_dim], len(positions) * (n // total), *t.shape[rot.token_dim + 1:])

            self._rotary[key] = type(full)(pick(t) for t in full) if isinstance(full, (tuple, list)) else pick(full)
        return self._rotary[key]

    # -- calls ------------------------------------------------------------------------------------
    def _num_steps(self, context: Any) -> int | None:
        n = getattr(context, "num_inference_steps", None)
        pipe = self._pipeline() if self._pipeline is not None else None
        if n is None and pipe is not None:
            ts = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
            n = len(ts) if ts is not None else None
        return n

    def _pipeline_guidance(self) -> bool | None:
        """The pipeline's own classifier-free-guidance flag where its class has one (most diffusers
        pipelines: a property of the running call's guidance scale; PixArt's is a local); None without
        a pipeline or such a property, or before the pipeline's first call set it."""
        pipe = self._pipeline() if self._pipeline is not None else None
        if pipe is None or not isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
            return None
        try:
            return bool(pipe.do_classifier_free_guidance)
        except Exception:  # noqa: BLE001 - e.g. _guidance_scale not set yet
            return None

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
        # batched CFG: identical latent halves, unless the pipeline itself says it is not guiding (a
        # batch of two prompts on one repeated latent is no CFG pair)
        batched = bool(b and b % 2 == 0 and self._pipeline_guidance() is not False
                       and torch.equal(hidden[: b // 2], hidden[b // 2:]))
        text: int | None = 0
        if self.info.joint_text:
            enc = kwargs.get("encoder_hidden_states")
            text = enc.shape[1] if isinstance(enc, torch.Tensor) else None
        return StepContext(branch, index, new, t, n, b, batched, text)

    def _denoiser_call(self, context: Any, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step = self._step(context, args, kwargs)
        outer = self._current, self.cache_context, self._hidden, self._rotary
        hidden = _hidden(args, kwargs)
        self._current, self.cache_context = step, context
        self._hidden, self._rotary = (hidden if isinstance(hidden, torch.Tensor) else None), {}
        chain = self._chains["denoiser_call"]

        def at(i: int, a: tuple, kw: dict) -> Any:
            if i == len(chain):
                return forward(*a, **kw)
            return chain[i].denoiser_call(step, ModuleCall(a, kw, lambda *a2, **kw2: at(i + 1, a2, kw2)))
        try:
            return at(0, args, kwargs)
        finally:
            self._current, self.cache_context, self._hidden, self._rotary = outer

    def _block_call(self, index: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step = self._current
        if step is None:  # the block was called outside a denoiser call
            return forward(*args, **kwargs)
        chain = self._chains["block_call"]

        def at(i: int, a: tuple, kw: dict) -> Any:
            if i == len(chain):
                return forward(*a, **kw)
            return chain[i].block_call(step, index, ModuleCall(a, kw, lambda *a2, **kw2: at(i + 1, a2, kw2)))
        return at(0, args, kwargs)

    def _attention_call(self, index: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step = self._current
        if step is None:
            return forward(*args, **kwargs)
        calls, ops = self._chains["attention_call"], self._chains["attention"]

        def attend(i: int, op: AttentionOp) -> torch.Tensor:
            if i == len(ops):
                return dataclasses.replace(op, inner=None).compute()
            return ops[i].attention(step, index, dataclasses.replace(op, inner=lambda o: attend(i + 1, o)))

        def handler(a: dict[str, Any]) -> torch.Tensor:
            q = a["query"]
            op = AttentionOp(q, a["key"], a["value"], a.get("attn_mask"), a.get("dropout_p", 0.0),
                             bool(a.get("is_causal", False)), a.get("scale"), bool(a.get("enable_gqa", False)),
                             self.info.text_span(q.shape[-2], step.text_tokens))
            return attend(0, op)

        def run(*a: Any, **kw: Any) -> Any:
            if not ops:
                return forward(*a, **kw)
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

        def at(i: int, a: tuple, kw: dict) -> Any:
            if i == len(calls):
                return run(*a, **kw)
            return calls[i].attention_call(step, index, ModuleCall(a, kw, lambda *a2, **kw2: at(i + 1, a2, kw2)))
        return at(0, args, kwargs)


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
        rec = session.install(_Recorder(session), self.method)
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
        return session.install(make_hooks(session), self.method)

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

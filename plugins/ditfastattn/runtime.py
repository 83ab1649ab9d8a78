"""DiTFastAttn on a diffusers denoiser, through diffusers' official ``ModelHook`` registry.

Two kinds of hook, all on module instances and all removed by ``detach()``:

* a stateful hook on the denoiser tracks the denoising step per cache context (the pipelines'
  ``"cond"``/``"uncond"`` calls; SD3/PixArt batch both CFG halves in one call, detected from the
  identical latent halves), the text length of MMDiT models and the start of each new run;
* a hook on every self-attention module (per :class:`~overdrive.contracts.DenoiserInfo`) applies the
  step's plan entry: AST returns the module's previous output; everything else runs the module's own
  processor (projections, norms, rotary untouched) with ``scaled_dot_product_attention`` intercepted
  by a scoped ``TorchFunctionMode`` that substitutes window / arrow attention, the WA-RS residual,
  per-head sharing and the CFG-half sharing. Nothing is patched on classes or processors.

Caches live in the attachment, per cache context, per module, with the batch dimension (so per
sample). The attachment counts the attention FLOPs it computed against full attention.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.overrides import TorchFunctionMode

from overdrive.config import ConfigError
from overdrive.contracts.dit_cache import DenoiserInfo, DiTCacheMethod

from .config import DiTFastAttnConfig
from .plan import FULL, Entry, Identity, Plan, Schedule, Uniform

DENOISER_HOOK = "overdrive_ditfastattn"
ATTENTION_HOOK = "overdrive_ditfastattn_attention"


@dataclasses.dataclass
class ModuleCache:
    out: Any = None                     # module output kept for AST at the next step
    heads: torch.Tensor | None = None   # attention output (B, H, S, D) kept for per-head sharing
    residual: torch.Tensor | None = None  # full - window at the last full step (WA-RS)
    shape: tuple[int, int, int, int] | None = None  # (B, H, S, D) of the last computed attention


@dataclasses.dataclass
class Run:
    """One denoising run in one cache context."""

    context: str
    step: int = -1
    last_t: float | None = None
    text_tokens: int = 0
    cfg_batched: bool = False
    checked: bool = False
    modules: dict[int, ModuleCache] = dataclasses.field(default_factory=dict)

    def cache(self, block: int) -> ModuleCache:
        return self.modules.setdefault(block, ModuleCache())


def _timestep(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep")
    if isinstance(t, torch.Tensor) and t.numel():
        return float(t.flatten()[0])
    return float(t) if isinstance(t, (int, float)) else None


def _sdpa_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, args))
    a.update(kwargs)
    return a


class _Intercept(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` inside one attention module call to ``handler``."""

    def __init__(self, handler: Any) -> None:
        super().__init__()
        self.handler, self.hits = handler, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.hits += 1
            return self.handler(_sdpa_args(args, kwargs))
        return func(*args, **kwargs)


class DiTFastAttnAttachment:
    """The state of DiTFastAttn on one denoiser; ``detach()`` removes every hook."""

    def __init__(self, denoiser: torch.nn.Module, cfg: DiTFastAttnConfig, info: DenoiserInfo,
                 pipeline: Any = None) -> None:
        self.denoiser, self.cfg, self.info, self.pipeline = denoiser, cfg, info, pipeline
        self.modules = [getattr(b, info.attention) for b in info.blocks(denoiser)]
        first = self.modules[0]
        self.heads = int(first.heads)
        self.head_dim = int(getattr(first, "head_dim", None) or first.inner_dim // first.heads)
        self.plan: Plan | None = Plan.load(cfg.plan) if cfg.plan else None
        self.schedule: Schedule | None = self.plan
        if self.plan is not None:
            ident = self.plan.identity
            for field, have in (("architecture", type(denoiser).__name__), ("blocks", len(self.modules)),
                                ("heads", self.heads), ("head_dim", self.head_dim)):
                if getattr(ident, field) != have:
                    raise ConfigError(
                        f"{cfg.plan}: DiTFastAttn plan was calibrated for {field}={getattr(ident, field)}, but "
                        f"this denoiser has {field}={have}; calibrate a plan for this model")
        self.runs: dict[str, Run] = {}
        self.current: Run | None = None
        self.cross: dict[int, tuple[int, str, Any]] = {}  # block -> (step, context, output) for separate-call ASC
        self.flops = {"full": 0, "computed": 0}
        self.reused = {"ast": 0, "asc": 0}
        self.geometry: tuple[int, int] | None = None  # (vision tokens, text tokens) seen in the attention
        # calibration: called as observer(block, q, k, v, scale, text_range, out, previous_heads) after
        # every full-attention computation
        self.observer: Any = None
        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_DenoiserHook(self), DENOISER_HOOK)
        for b, m in enumerate(self.modules):
            HookRegistry.check_if_exists_or_initialize(m).register_hook(_AttentionHook(self, b), ATTENTION_HOOK)

    # -- public -------------------------------------------------------------------------------------
    def detach(self) -> None:
        for m in self.modules:
            HookRegistry.check_if_exists_or_initialize(m).remove_hook(ATTENTION_HOOK, recurse=False)
        HookRegistry.check_if_exists_or_initialize(self.denoiser).remove_hook(DENOISER_HOOK, recurse=False)
        self.runs.clear()
        self.cross.clear()

    @property
    def flops_fraction(self) -> float:
        """Attention FLOPs computed / full-attention FLOPs, over every hooked call since attach."""
        return self.flops["computed"] / self.flops["full"] if self.flops["full"] else 1.0

    def reset(self) -> None:
        """Forget every cache (the next denoiser call starts a new run)."""
        self.runs.clear()
        self.cross.clear()

    # -- denoiser level -----------------------------------------------------------------------------
    def _expected_steps(self, context: Any) -> int | None:
        n = getattr(context, "num_inference_steps", None) if context is not None else None
        if n is None and self.pipeline is not None:
            ts = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
            n = len(ts) if ts is not None else None
        return n

    def begin_call(self, context: Any, args: tuple, kwargs: dict) -> None:
        name = context.name if context is not None else "default"
        t = _timestep(args, kwargs)
        step_index = getattr(context, "step_index", None) if context is not None else None
        run = self.runs.get(name)
        new = run is None or step_index == 0 or (step_index is None and t is not None and run.last_t is not None
                                                 and t >= run.last_t)
        if new:
            run = self.runs[name] = Run(name)
            expected = self._expected_steps(context)
            if self.plan is not None and expected is not None and expected != self.plan.steps:
                raise ConfigError(
                    f"{self.cfg.plan}: DiTFastAttn plan was calibrated for steps={self.plan.steps}, but this run has "
                    f"num_inference_steps={expected}; calibrate a plan for this step count")
        run.step = step_index if step_index is not None else run.step + 1
        run.last_t = t
        if self.plan is not None and run.step >= self.plan.steps:
            raise ConfigError(f"{self.cfg.plan}: DiTFastAttn plan covers {self.plan.steps} steps, this run reached "
                              f"step {run.step + 1}; calibrate a plan for this step count")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        b = hidden.shape[0] if isinstance(hidden, torch.Tensor) else 0
        run.cfg_batched = bool(b and b % 2 == 0 and torch.equal(hidden[: b // 2], hidden[b // 2:]))
        if self.info.joint_text:
            enc = kwargs.get("encoder_hidden_states")
            if not isinstance(enc, torch.Tensor):
                raise RuntimeError(f"DiTFastAttn: {type(self.denoiser).__name__} was called without "
                                   "encoder_hidden_states; the text length of its joint attention is unknown")
            run.text_tokens = enc.shape[1]
        self.current = run

    # -- attention module level ---------------------------------------------------------------------
    def entry(self, run: Run, block: int) -> Entry:
        if self.schedule is None:
            return FULL  # plan-less methods start after `warmup` >= 1 full steps; the schedule is set at step 0
        return self.schedule.entry(run.step, block)

    def module_forward(self, block: int, original: Any, args: tuple, kwargs: dict) -> Any:
        run = self.current
        if run is None:
            return original(*args, **kwargs)
        e = self.entry(run, block)
        cache = run.cache(block)
        if e.skip:
            if cache.out is None:
                raise RuntimeError(f"DiTFastAttn: block {block} step {run.step}: AST has no previous output to reuse")
            self._count_full(cache.shape)
            self.reused["ast"] += 1
            return cache.out
        if e.asc and not run.cfg_batched:
            prev = self.cross.get(block)
            if prev is not None and prev[0] == run.step and prev[1] != run.context:
                self._count_full(cache.shape)
                self.reused["asc"] += 1
                out = prev[2]
                if self.schedule.keep_output(run.step, block):
                    cache.out = out
                return out
        mode = _Intercept(lambda a: self._attention(run, block, e, a))
        with mode:
            out = original(*args, **kwargs)
        if mode.hits != 1:
            raise RuntimeError(
                f"DiTFastAttn: attention module {block} ({type(self.modules[block]).__name__}) made {mode.hits} calls "
                "to scaled_dot_product_attention; DiTFastAttn needs diffusers' native attention backend (one SDPA "
                "call per module). Reset other attention backends with transformer.reset_attention_backend().")
        if self.schedule.keep_output(run.step, block):
            cache.out = out
        if e.asc and not run.cfg_batched:
            self.cross[block] = (run.step, run.context, out)
        return out

    def _text_range(self, run: Run, s: int) -> tuple[int, int]:
        if not self.info.joint_text or not run.text_tokens:
            return 0, 0
        return (0, run.text_tokens) if self.info.text_first else (s - run.text_tokens, s)

    def _check(self, run: Run, b: int, h: int, s: int, d: int) -> None:
        vision = s - run.text_tokens if self.info.joint_text else s
        self.geometry = (vision, run.text_tokens if self.info.joint_text else 0)
        if self.plan is not None:
            have = Identity(type(self.denoiser).__name__, self.info.family, len(self.modules), h, d, vision,
                            run.text_tokens if self.info.joint_text else 0, self.plan.steps)
            self.plan.identity.mismatch(have, self.cfg.plan)
        elif self.schedule is None:
            window = max(1, round(self.cfg.window_fraction * vision))
            self.schedule = Uniform.of(self.cfg.strategy, h, vision, window, self.cfg.warmup, self.cfg.arrow_k)
        run.checked = True

    def _attention(self, run: Run, block: int, e: Entry, a: dict[str, Any]) -> torch.Tensor:
        q, k, v = a["query"], a["key"], a["value"]
        b, h, s, d = q.shape
        if not run.checked:
            self._check(run, b, h, s, d)
        scale = a.get("scale")
        cache = run.cache(block)
        cache.shape = (b, h, s, d)
        previous_heads = cache.heads
        sched = self.schedule
        rw = sched.residual_window(run.step, block) if e.is_full else None
        keep_heads = sched.keep_heads(run.step, block)
        full = b * h * s * s * 4 * d
        self.flops["full"] += full
        if e.is_full and rw is None:
            out = F.scaled_dot_product_attention(**a)
            self.flops["computed"] += full
            if self.observer is not None:
                self.observer(block, q, k, v, a.get("scale"), self._text_range(run, s), out, previous_heads)
            if keep_heads:
                cache.heads = out
            return out
        if a.get("attn_mask") is not None or a.get("is_causal") or a.get("dropout_p") or a.get("enable_gqa"):
            raise RuntimeError(f"DiTFastAttn: attention module {block} uses a mask, causal attention, dropout or "
                               "GQA, which window attention does not take; keep it 'full' in the plan")
        from overdrive.kernels import attention_flops, window_attention

        text = self._text_range(run, s)
        half = e.asc and run.cfg_batched
        sel = slice(b // 2, b) if half else slice(None)
        share = e.share_heads or (False,) * h
        fresh = [i for i in range(h) if not share[i]]
        win = [(-1 if e.window is None else e.window[i]) for i in range(h)]
        bq = b - b // 2 if half else b
        computed = 0
        if fresh:
            heads = slice(None) if len(fresh) == h else fresh  # a slice avoids copying q, k, v
            qs, ks, vs = (x[sel][:, heads] for x in (q, k, v))
            wf = torch.tensor([s - 1 if win[i] < 0 else min(win[i], s - 1) for i in fresh])
            if bool((wf >= s - 1).all()):
                part = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            else:
                part = window_attention(qs, ks, vs, wf, *text, scale=scale)
            computed += bq * attention_flops(s, d, wf, *text)
            if e.residual:
                if cache.residual is None:
                    raise RuntimeError(f"DiTFastAttn: block {block} step {run.step}: WA-RS has no cached residual")
                part = part + cache.residual[sel][:, heads]
        if e.share_heads:
            if cache.heads is None:
                raise RuntimeError(f"DiTFastAttn: block {block} step {run.step}: head sharing has no previous output")
            out = cache.heads[sel].clone()
            if fresh:
                out[:, fresh] = part
        else:
            out = part
        if half:
            out = torch.cat([out, out], dim=0)
            self.reused["asc"] += 1
        if rw is not None:  # a full step that prepares the residual for a later WA-RS step
            wr = torch.full((h,), min(rw, s - 1))
            cache.residual = out - window_attention(q, k, v, wr, *text, scale=scale)
            computed += b * attention_flops(s, d, wr, *text)
            if self.observer is not None:
                self.observer(block, q, k, v, scale, text, out, previous_heads)
        if keep_heads:
            cache.heads = out
        self.flops["computed"] += computed
        return out

    def _count_full(self, shape: tuple[int, int, int, int] | None) -> None:
        if shape is not None:
            b, h, s, d = shape
            self.flops["full"] += b * h * s * s * 4 * d


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _DenoiserHook(ModelHook):
    _is_stateful = True  # so that diffusers' cache_context() hands this hook the context

    def __init__(self, att: DiTFastAttnAttachment) -> None:
        super().__init__()
        self.att = att
        self.state_manager = StateManager(_NoState)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.att.begin_call(self.state_manager._context, args, kwargs)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.att.reset()
        return module


class _AttentionHook(ModelHook):
    def __init__(self, att: DiTFastAttnAttachment, block: int) -> None:
        super().__init__()
        self.att, self.block = att, block

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.att.module_forward(self.block, self.fn_ref.original_forward, args, kwargs)


class DiTFastAttnMethod(DiTCacheMethod):
    def attach(self, denoiser: torch.nn.Module, cfg: DiTFastAttnConfig, info: DenoiserInfo) -> DiTFastAttnAttachment:
        return DiTFastAttnAttachment(denoiser, cfg, info)

    def attach_pipeline(self, pipeline: Any, denoiser: torch.nn.Module, cfg: DiTFastAttnConfig,
                        info: DenoiserInfo) -> DiTFastAttnAttachment:
        return DiTFastAttnAttachment(denoiser, cfg, info, pipeline)


METHOD = DiTFastAttnMethod()

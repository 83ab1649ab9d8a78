"""DiTFastAttn as callbacks of overdrive's diffusers hook layer (framework-neutral: no diffusers here).

The layer (``overdrive.adapters.diffusers.hooks``) tells the method, per denoiser call, the step
context (CFG branch, step, new run, batched CFG, text length of MMDiT models) and calls it at every
self-attention module and at the attention op inside it:

* ``denoiser_call``: per branch, starts a new :class:`Run` at a new run and checks the plan's step
  count;
* ``attention_call``: applies the step's plan entry: AST returns the module's previous output;
  separate-call ASC returns the other branch's output at the same step; everything else runs the
  module's own processor (``call.run()``);
* ``attention``: the attention op inside that call: window / arrow attention, the WA-RS residual,
  per-head sharing and batched-CFG sharing.

Caches live in the hooks object, per branch, per module, with the batch dimension (so per sample).
It counts the attention FLOPs it computed against full attention.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from overdrive.config import ConfigError
from overdrive.contracts.dit_cache import AttentionOp, DenoiserSession, DiTHooks, ModuleCall, StepContext

from .config import FULL, DiTFastAttnConfig, Entry, Identity, Plan, Schedule, Uniform


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
    step: int = 0
    first: int = 0          # the step the run started at (> 0 after the caches were invalidated mid-run)
    text_tokens: int = 0
    cfg_batched: bool = False
    checked: bool = False
    modules: dict[int, ModuleCache] = dataclasses.field(default_factory=dict)

    def cache(self, block: int) -> ModuleCache:
        return self.modules.setdefault(block, ModuleCache())


class DiTFastAttnHooks(DiTHooks):
    """The state of DiTFastAttn on one denoiser (what ``overdrive.diffusers.enable`` returns)."""

    def __init__(self, session: DenoiserSession, cfg: DiTFastAttnConfig) -> None:
        super().__init__(session)
        self.cfg, self.info = cfg, session.info
        self.modules = session.attention_modules
        self.heads, self.head_dim = session.heads, session.head_dim
        self.plan: Plan | None = Plan.load(cfg.plan) if cfg.plan else None
        self.schedule: Schedule | None = self.plan
        if self.plan is not None:
            ident = self.plan.identity
            for field, have in (("architecture", session.architecture), ("blocks", len(self.modules)),
                                ("heads", self.heads), ("head_dim", self.head_dim)):
                if getattr(ident, field) != have:
                    raise ConfigError(
                        f"{cfg.plan}: DiTFastAttn plan was calibrated for {field}={getattr(ident, field)}, but "
                        f"this denoiser has {field}={have}; calibrate a plan for this model")
        self.runs: dict[str, Run] = {}
        self.current: Run | None = None
        self.cross: dict[int, tuple[int, str, Any]] = {}  # block -> (step, branch, output) for separate-call ASC
        self.flops = {"full": 0, "computed": 0}
        self.reused = {"ast": 0, "asc": 0}
        self.geometry: tuple[int, int] | None = None  # (vision tokens, text tokens) seen in the attention
        # calibration: called as observer(block, q, k, v, scale, text_range, out, previous_heads) after
        # every full-attention computation
        self.observer: Any = None

    @property
    def architecture(self) -> str:
        return self.session.architecture

    @property
    def flops_fraction(self) -> float:
        """Attention FLOPs computed / full-attention FLOPs, over every hooked call since attach."""
        return self.flops["computed"] / self.flops["full"] if self.flops["full"] else 1.0

    def reset_caches(self) -> None:
        self.runs.clear()
        self.cross.clear()
        self.current = None

    # -- denoiser level -----------------------------------------------------------------------------
    def denoiser_call(self, step: StepContext, call: ModuleCall) -> Any:
        run = self.runs.get(step.branch)
        if run is None or step.new_run:
            run = self.runs[step.branch] = Run(step.branch, first=0 if step.new_run else step.step)
            if self.plan is not None and step.num_steps is not None and step.num_steps != self.plan.steps:
                raise ConfigError(
                    f"{self.cfg.plan}: DiTFastAttn plan was calibrated for steps={self.plan.steps}, but this run has "
                    f"num_inference_steps={step.num_steps}; calibrate a plan for this step count")
        run.step = step.step
        if self.plan is not None and run.step >= self.plan.steps:
            raise ConfigError(f"{self.cfg.plan}: DiTFastAttn plan covers {self.plan.steps} steps, this run reached "
                              f"step {run.step + 1}; calibrate a plan for this step count")
        run.cfg_batched = step.cfg_batched
        if self.info.joint_text:
            if step.text_tokens is None:
                raise RuntimeError(f"DiTFastAttn: {self.session.architecture} was called without "
                                   "encoder_hidden_states; the text length of its joint attention is unknown")
            run.text_tokens = step.text_tokens
        self.current = run
        return call.run()

    # -- attention module level ---------------------------------------------------------------------
    def entry(self, run: Run, block: int) -> Entry:
        if self.schedule is None:
            return FULL  # plan-less methods start after `warmup` >= 1 full steps; the schedule is set at step 0
        if run.first and run.step == run.first:
            return FULL  # the caches were dropped mid-run (session.invalidate: the latent changed shape)
        return self.schedule.entry(run.step, block)

    def attention_call(self, step: StepContext, block: int, call: ModuleCall) -> Any:
        run = self.current
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
        out = call.run()  # the module's own processor; its attention op comes to attention() below
        if self.schedule.keep_output(run.step, block):
            cache.out = out
        if e.asc and not run.cfg_batched:
            self.cross[block] = (run.step, run.context, out)
        return out

    def _check(self, run: Run, op: AttentionOp) -> None:
        b, h, s, d = op.query.shape
        text = op.text[1] - op.text[0]
        vision = s - text
        self.geometry = (vision, text)
        if self.plan is not None:
            have = Identity(self.session.architecture, self.info.family, len(self.modules), h, d, vision, text,
                            self.plan.steps)
            self.plan.identity.mismatch(have, self.cfg.plan)
        elif self.schedule is None:
            window = max(1, round(self.cfg.window_fraction * vision))
            self.schedule = Uniform.of(self.cfg.strategy, h, vision, window, self.cfg.warmup, self.cfg.arrow_k)
        run.checked = True

    def attention(self, step: StepContext, block: int, op: AttentionOp) -> torch.Tensor:
        run = self.current
        q, k, v = op.query, op.key, op.value
        b, h, s, d = q.shape
        if not run.checked:
            self._check(run, op)
        e = self.entry(run, block)
        scale = op.scale
        cache = run.cache(block)
        cache.shape = (b, h, s, d)
        previous_heads = cache.heads
        sched = self.schedule
        rw = sched.residual_window(run.step, block) if e.is_full else None
        keep_heads = sched.keep_heads(run.step, block)
        full = b * h * s * s * 4 * d
        self.flops["full"] += full
        if e.is_full and rw is None:
            out = op.compute()
            self.flops["computed"] += full
            if self.observer is not None:
                self.observer(block, q, k, v, scale, op.text, out, previous_heads)
            if keep_heads:
                cache.heads = out
            return out
        if not op.plain:
            raise RuntimeError(f"DiTFastAttn: attention module {block} uses a mask, causal attention, dropout or "
                               "GQA, which window attention does not take; keep it 'full' in the plan")
        from overdrive.kernels import attention_flops, window_attention

        text = op.text
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
                part = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale)
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

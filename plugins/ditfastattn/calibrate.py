"""DiTFastAttn calibration: search a plan on a diffusers pipeline and write it as JSON.

    overdrive calibrate --method ditfastattn --pipeline DIR --output PLAN.json [--variant v1|v2] ...   (:mod:`.cli`)

or from Python::

    import overdrive.diffusers as odd
    plan = odd.calibrate(pipe, "ditfastattn", {"variant": "v2", "alpha": 0.2}, num_inference_steps=20, prompt=[...])
    plan.save("plan.json")

The diffusers hook layer does the framework part (running and recording the pipeline, replaying
denoiser calls in their recorded step contexts); this module only sees a
:class:`~overdrive.contracts.dit_cache.CalibrationRun`.

How it searches (both variants):

1. the pipeline runs once unaccelerated; every denoiser call is recorded (inputs, step context,
   output), grouped into steps (the layer's step rule: the pipelines' "cond" and "uncond" calls are
   one step, batched-CFG pipelines make one call per step);
2. step by step, the recorded calls of the step are replayed through DiTFastAttn with the plan chosen
   for the earlier steps in force (their caches: outputs for AST, residuals for WA-RS, per-head
   outputs for sharing), and candidates are judged against the recorded unaccelerated outputs.
   The inputs are the unaccelerated trajectory's ("teacher forcing"): one recording serves every
   trial, and each step's error is the error that step adds, not the drift the earlier steps caused
   (the reference implementations calibrate along the accelerated trajectory instead);
3. the chosen entries of the step are replayed once more to commit the caches the next step reuses.

v1 (DiTFastAttn, per block): step 0 is full; at every later step, blocks in order try AST, then
WA-RS+ASC, then WA-RS, then ASC (ASC only under CFG; WA-RS only after a full step of that block) and
keep the first whose loss on the denoiser output, mean clip(|a - b| / (max(|a|, |b|) + 1e-6), 0, 10),
stays under ``threshold * (block + 1) / blocks``; earlier choices stay applied while later blocks are
tried.

v2 (DiTFastAttnV2, per head): at every step >= 1, one replay with full attention measures each head's
relative squared error ``mean((O' - O)^2) / Var(O)`` of its attention output O for every candidate
(share the previous step's head output, arrow:8/16/32); candidates with rse >= 1.5 alpha / H are
dropped; then, per block, an integer program (``scipy.optimize.milp``) picks at most one candidate per
head maximising the attention FLOPs saved, each candidate costed exactly (allowed query-key pairs of
its band with the text rows and columns) under ``sum(rse) <= alpha``.
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.dit_cache import CalibrationRun, RecordedCall

from .config import (ARROW_KS, FULL, V1_DEFAULT_THRESHOLD, V2_DEFAULT_ALPHA, DiTFastAttnConfig, Entry, Identity, Plan,
                     Schedule, band_for, flops_fraction, parse_entry)
from .runtime import DiTFastAttnHooks


# --------------------------------------------------------------------------------- replay state
class CalibrationSchedule(Schedule):
    """Entries chosen so far; keeps every cache a later candidate might need."""

    def __init__(self, window: int | None) -> None:
        self.rows: dict[int, list[Entry]] = {}
        self.window = window

    def entry(self, step: int, block: int) -> Entry:
        row = self.rows.get(step)
        return row[block] if row is not None else FULL

    def keep_output(self, step: int, block: int) -> bool:
        return True

    def keep_heads(self, step: int, block: int) -> bool:
        return True

    def residual_window(self, step: int, block: int) -> int | None:
        return self.window


def _copy_runs(runs: dict) -> dict:
    return {k: dataclasses.replace(r, modules={b: dataclasses.replace(c) for b, c in r.modules.items()})
            for k, r in runs.items()}


def _snapshot(att: Any) -> tuple[dict, dict]:
    """The attachment's caches (cache entries are replaced, never mutated, so shallow copies suffice)."""
    return _copy_runs(att.runs), dict(att.cross)


def _restore(att: Any, snap: tuple[dict, dict]) -> None:
    att.runs, att.cross, att.current = _copy_runs(snap[0]), dict(snap[1]), None


def v1_loss(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """DiTFastAttn's loss: mean clip(|a - b| / (max(|a|, |b|) + 1e-6), 0, 10) over every call of the step."""
    total = count = 0.0
    for a, b in zip(outs, refs):
        a, b = a.double(), b.double()
        rel = ((a - b).abs() / (torch.maximum(a.abs(), b.abs()) + 1e-6)).clamp(0, 10)
        total += float(rel.sum())
        count += rel.numel()
    return total / count


def _cfg_in(calls: Sequence[RecordedCall]) -> bool:
    """Whether a step runs classifier-free guidance: one call per branch, or both halves in one batch."""
    return len(calls) > 1 or calls[0].step.cfg_batched


# ---------------------------------------------------------------------------------- the search
@dataclasses.dataclass
class _Search:
    att: Any
    run: CalibrationRun
    steps: list[list[RecordedCall]]
    sched: CalibrationSchedule

    @property
    def blocks(self) -> int:
        return len(self.att.modules)

    def commit(self, t: int, row: list[Entry], snap: tuple[dict, dict]) -> None:
        self.sched.rows[t] = row
        _restore(self.att, snap)
        self.run.replay(self.steps[t])


def _v1(search: _Search, threshold: float, window: int) -> tuple[list[list[Entry]], list[float]]:
    att, n = search.att, search.blocks
    heads = att.heads
    wars = Entry(residual=True, window=(window,) * heads)
    wars_asc = dataclasses.replace(wars, asc=True)
    ast, asc = Entry(skip=True), Entry(asc=True)
    losses = [0.0]
    full_seen = [True] * n  # step 0 is full for every block
    for t in range(1, len(search.steps)):
        calls = search.steps[t]
        refs = [c.output for c in calls]
        cfg = _cfg_in(calls)
        snap = _snapshot(att)
        row = [FULL] * n
        loss = 0.0
        for b in range(n):
            bound = threshold * (b + 1) / n
            candidates = [ast] + ([wars_asc] if cfg and full_seen[b] else []) + ([wars] if full_seen[b] else []) \
                + ([asc] if cfg else [])
            for cand in candidates:
                row[b] = cand
                search.sched.rows[t] = row
                _restore(att, snap)
                trial = v1_loss(search.run.replay(calls), refs)
                if trial < bound:
                    loss = trial
                    break
            else:
                row[b] = FULL
        search.commit(t, row, snap)
        losses.append(loss)
    return [search.sched.rows[t] for t in range(len(search.steps))], losses


class _HeadErrors:
    """Observer: per head, the rse of every v2 candidate against the full attention output."""

    def __init__(self, vision: int) -> None:
        self.vision = vision
        self.rse: dict[int, dict[str, torch.Tensor]] = {}
        self.geometry: dict[int, tuple[int, int, tuple[int, int]]] = {}

    def __call__(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Any,
                 text: tuple[int, int], out: torch.Tensor, previous: torch.Tensor | None) -> None:
        from overdrive.kernels import window_attention

        o = out.double()
        var = o.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-12)

        def rse(x: torch.Tensor) -> torch.Tensor:
            return ((x.double() - o) ** 2).mean(dim=(0, 2, 3)) / var

        b, h, s, d = q.shape
        errs: dict[str, torch.Tensor] = {}
        if previous is not None and previous.shape == out.shape:
            errs["share"] = rse(previous)
        for kk in ARROW_KS:
            w = band_for(kk, self.vision)
            if w >= s - 1:
                continue
            errs[f"arrow:{kk}"] = rse(window_attention(q, k, v, torch.full((h,), w), *text, scale=scale))
        self.rse[block] = errs
        self.geometry[block] = (s, d, text)


def choose_heads(rse: dict[str, Sequence[float]], saving: dict[str, float], heads: int, alpha: float) -> list[str]:
    """v2's integer program for one block: per head at most one candidate, max saving, sum(rse) <= alpha."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    cut = 1.5 * alpha / heads
    options = [(h, c) for c in rse for h in range(heads) if float(rse[c][h]) < cut and saving[c] > 0]
    if not options:
        return ["full"] * heads
    gain = np.array([saving[c] for _, c in options], dtype=float)
    err = np.array([float(rse[c][h]) for h, c in options], dtype=float)
    one = np.zeros((heads, len(options)))
    for j, (h, _) in enumerate(options):
        one[h, j] = 1.0
    res = milp(c=-gain / gain.max(), integrality=np.ones(len(options)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(err[None, :], -np.inf, alpha), LinearConstraint(one, 0, 1)])
    if res.x is None:
        raise RuntimeError(f"DiTFastAttn v2 calibration: the integer program failed ({res.message})")
    codes = ["full"] * heads
    for j, (h, c) in enumerate(options):
        if res.x[j] > 0.5:
            codes[h] = c
    return codes


def _v2(search: _Search, alpha: float, vision: int) -> tuple[list[list[Entry]], list[float]]:
    from overdrive.kernels import attention_flops


    att, n, heads = search.att, search.blocks, search.att.heads
    predicted = [0.0]
    for t in range(1, len(search.steps)):
        snap = _snapshot(att)
        observer = _HeadErrors(vision)
        search.sched.rows[t] = [FULL] * n
        att.observer = observer
        try:
            search.run.replay(search.steps[t])
        finally:
            att.observer = None
        row, spent = [], 0.0
        for b in range(n):
            errs = observer.rse.get(b)
            if not errs:
                row.append(FULL)
                continue
            s, d, text = observer.geometry[b]
            full_head = s * s * 4 * d
            saving = {c: float(full_head if c == "share" else
                               full_head - attention_flops(s, d, torch.tensor([band_for(int(c[6:]), vision)]), *text))
                      for c in errs}
            codes = choose_heads({c: e.tolist() for c, e in errs.items()}, saving, heads, alpha)
            spent = max(spent, sum(float(errs[c][h]) for h, c in enumerate(codes) if c != "full"))
            row.append(parse_entry(codes, heads, vision, 0, f"step {t} block {b}"))
        search.commit(t, row, snap)
        predicted.append(spent)
    return [search.sched.rows[t] for t in range(len(search.steps))], predicted


def calibrate(run: CalibrationRun, variant: str = "v1", threshold: float = V1_DEFAULT_THRESHOLD,
              alpha: float = V2_DEFAULT_ALPHA, window_fraction: float = 0.125) -> Plan:
    """Calibrate a DiTFastAttn plan on one recorded pipeline call (``overdrive.diffusers.calibrate``).

    The plan fits the call's resolution (vision tokens), text length and ``num_inference_steps``;
    a batch of several prompts in the call calibrates on all of them at once.
    """

    if variant not in ("v1", "v2"):
        raise ConfigError(f"variant must be 'v1' or 'v2', got {variant!r}")
    if not 0 < threshold:
        raise ConfigError(f"threshold must be > 0, got {threshold}")
    if not 0 < alpha:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if not 0 < window_fraction < 1:
        raise ConfigError(f"window_fraction must be in (0, 1), got {window_fraction}")
    steps = run.record()
    if len(steps) < 2:
        raise ConfigError("calibration needs at least 2 denoising steps (step 0 is always full attention)")
    att = run.attach(lambda session: DiTFastAttnHooks(session, DiTFastAttnConfig(strategy="full")))
    try:
        sched = CalibrationSchedule(None)
        att.schedule = sched
        search = _Search(att, run, steps, sched)
        empty = _snapshot(att)
        search.commit(0, [FULL] * len(att.modules), empty)
        if att.geometry is None:
            raise RuntimeError("DiTFastAttn calibration: no attention call reached the hooked modules")
        vision, text = att.geometry
        window = max(1, round(window_fraction * vision))
        if variant == "v1":
            sched.window = window  # full steps now also cache the WA-RS residual
            search.commit(0, [FULL] * len(att.modules), empty)
            entries, per_step = _v1(search, threshold, window)
        else:
            entries, per_step = _v2(search, alpha, vision)
    finally:
        att.detach()
    info = run.info
    cfg = _cfg_in(steps[0])
    identity = Identity(run.architecture, info.family, len(att.modules), att.heads, att.head_dim,
                        vision, text, len(steps))
    s_total = vision + text
    text_range = info.text_span(s_total, text)
    meta = {
        "calibrated": datetime.date.today().isoformat(),
        "variant": variant,
        "threshold" if variant == "v1" else "alpha": threshold if variant == "v1" else alpha,
        "window_fraction": window_fraction,
        "samples": steps[0][0].step.batch // (2 if cfg and len(steps[0]) == 1 else 1),
        "cfg": cfg,
        "teacher_forced": True,
        "per_step": ["v1 loss" if variant == "v1" else "max block sum(rse)", [round(x, 6) for x in per_step]],
        "predicted_attention_flops_fraction": round(flops_fraction(entries, att.heads, s_total, text_range,
                                                                   att.head_dim, cfg), 6),
    }
    return Plan(identity, variant, window if variant == "v1" else 0, entries, meta)

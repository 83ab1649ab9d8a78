"""ViDiT-Q calibration: statistics per timestep range on a real denoising run, then a quantized checkpoint.

    overdrive calibrate --method viditq --pipeline DIR --steps 20 --prompt "..." --scheme w4a8 --output OUT  (:mod:`.cli`)

or ``overdrive.diffusers.calibrate(pipe, "viditq", {"scheme": "w4a8"}, prompt=..., num_inference_steps=20)``
(returns a :class:`ViDiTQCheckpoint`; ``.save(DIR)`` writes the denoiser directory).

1. The pipeline runs once unquantized; its denoiser calls are recorded (the hook layer) and grouped
   into steps. The steps are split into ``ranges`` contiguous timestep ranges.
2. The recorded calls are replayed step by step with torch forward pre-hooks on every quantized
   linear layer: per range, an EMA (``ema``) over calls of the per-input-channel max |x|.
3. Channel balancing per range: ``s = amax_x^alpha / amax_w^(1-alpha)``. ``alpha`` is a number (all
   ranges), a list (one per range), None (no balancing: ViDiT-Q's W8A8) or "search": per range, each
   value of ``alpha_grid`` (None included) is tried with every layer quantized, on the range's
   recorded calls (teacher-forced: the float trajectory's inputs), and the one with the lowest
   relative squared error of the denoiser output is kept.
4. Mixed precision (``mixed_precision`` = the largest fraction of quantized weights kept at 8 bits,
   W4A8 only): per range, each layer group (the same layer across blocks, e.g.
   ``transformer_blocks.attn.to_q``) is measured alone at 4 bits with the rest at 8; the groups
   whose error per weight is largest go to 8 bits while the fraction allows.
5. Weights are quantized per output channel (float64 arithmetic), one variant per distinct (bits,
   balancing) of a layer across ranges, and written with the plan (format: docs/methods/viditq.md).
"""
from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.dit_cache import CalibrationRun, DiTHooks, RecordedCall
from overdrive.progress import progress

from .config import DEFAULT_ALPHA_GRID, DEFAULT_EMA, NAME, SCHEMES, Identity, LayerPlan, Plan, Variant, split_steps
from .numerics import quantize_weight, relative_error, smoothing_factors, weight_channel_max
from .runtime import QuantState, ViDiTQLinear, float_linears, swap_module


@dataclasses.dataclass
class ViDiTQCheckpoint:
    """What calibration returns: the plan, the quantized layers' tensors, and a writer of the denoiser."""

    plan: Plan
    tensors: dict[str, torch.Tensor]
    writer: Any
    denoiser_checkpoint = True  # `overdrive calibrate` writes a whole pipeline directory around it

    def save(self, path: Any) -> Any:
        """Write the quantized denoiser as a diffusers model directory (atomically)."""
        return self.writer(path, self.tensors, self.plan.to_quantization_config(), list(self.plan.layers))

    def summary(self) -> str:
        return self.plan.summary()


# ---------------------------------------------------------------------------------- options
def _alpha_per_range(alpha: Any, n: int) -> list[Any]:
    """'search', None, a number, or a list of n of (None | number)."""
    if alpha == "search" or alpha is None or isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return [alpha] * n
    if isinstance(alpha, (list, tuple)) and len(alpha) == n:
        return list(alpha)
    raise ConfigError(f"alpha must be 'search', None, a number in [0, 1] or a list of {n} (one per timestep range), "
                      f"got {alpha!r}")


def _check_alpha(a: Any) -> None:
    if a is not None and a != "search" and not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
        raise ConfigError(f"alpha values must be in [0, 1] (or None / 'search'), got {a!r}")


# ------------------------------------------------------------------------------ calibration
class _Stats:
    """Per layer and range: EMA over calls of the per-input-channel max |x|."""

    def __init__(self, layers: dict[str, torch.nn.Linear], n_ranges: int, ema: float) -> None:
        self.act: dict[str, list[torch.Tensor | None]] = {n: [None] * n_ranges for n in layers}
        self.range = 0
        self.ema = ema
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float64)
            prev = self.act[name][self.range]
            self.act[name][self.range] = m if prev is None else self.ema * prev + (1 - self.ema) * m
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _group(name: str) -> str:
    """Layer group for mixed precision: the layer name without its block index."""
    return re.sub(r"\.\d+\.", ".", name, count=1)


class _Trial:
    """Quantized stand-ins for the float layers, swapped in for one evaluation and swapped back."""

    def __init__(self, model: torch.nn.Module, layers: dict[str, torch.nn.Linear]) -> None:
        self.model, self.layers = model, layers
        self.state = QuantState(None)  # type: ignore[arg-type]
        self.state.range = 0

    def build(self, name: str, bits: int, smooth: torch.Tensor | None) -> ViDiTQLinear:
        return ViDiTQLinear.from_float(name, self.layers[name], self.state, [(bits, smooth)], [0])

    def error(self, run: CalibrationRun, calls: Sequence[RecordedCall], choice: dict[str, tuple[int, Any]]) -> float:
        """Relative squared error of the denoiser outputs with ``choice`` (name -> (bits, smooth))."""
        built = {n: self.build(n, b, s) for n, (b, s) in choice.items()}
        old = {n: swap_module(self.model, n, q) for n, q in built.items()}
        try:
            outs = run.replay(calls)
        finally:
            for n, m in old.items():
                swap_module(self.model, n, m)
        return relative_error(outs, [c.output for c in calls])


def calibrate(run: CalibrationRun, scheme: str = "w8a8", ranges: int = 2, alpha: Any = "default",
              alpha_grid: Sequence[Any] = DEFAULT_ALPHA_GRID, mixed_precision: float = 0.0,
              keep_float: Sequence[str] = (), ema: float = DEFAULT_EMA) -> ViDiTQCheckpoint:
    """Calibrate ViDiT-Q on one recorded pipeline call (``overdrive.diffusers.calibrate``); see the module doc.

    ``alpha="default"``: None (no channel balancing) for W8A8, "search" for W4A8 (as ViDiT-Q's plans).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if not isinstance(ranges, int) or ranges < 1:
        raise ConfigError(f"ranges must be a positive integer (1 = not timestep-aware), got {ranges!r}")
    if not 0.0 <= mixed_precision <= 1.0:
        raise ConfigError(f"mixed_precision is the largest fraction of quantized weights kept at 8 bits, in [0, 1]; "
                          f"got {mixed_precision}")
    if mixed_precision and scheme != "w4a8":
        raise ConfigError("mixed_precision chooses 8 bits for sensitive layer groups of a W4A8 scheme; use scheme='w4a8'")
    if not 0.0 <= ema < 1.0:
        raise ConfigError(f"ema must be in [0, 1), got {ema}")
    if alpha == "default":
        alpha = None if scheme == "w8a8" else "search"
    for a in list(alpha_grid) + (list(alpha) if isinstance(alpha, (list, tuple)) else [alpha]):
        _check_alpha(a)
    bits = SCHEMES[scheme]

    steps = run.record()
    n_steps = len(steps)
    spans = split_steps(n_steps, ranges)
    alphas = _alpha_per_range(alpha, len(spans))
    probe = run.attach(DiTHooks)  # the session: the denoiser and its blocks (replays need no callbacks)
    session = probe.session
    model = session.module
    try:
        layers = float_linears(model, session.info, tuple(keep_float))
        if not layers:
            raise ConfigError(f"{session.architecture}: no linear layer inside the transformer blocks to quantize "
                              f"(keep_float={list(keep_float)})")
        range_of = [next(r for r, (a, b) in enumerate(spans) if a <= t < b) for t in range(n_steps)]
        stats = _Stats(layers, len(spans), ema)
        try:
            for t, calls in progress(list(enumerate(steps)), desc="viditq: activation statistics", unit="step"):
                stats.range = range_of[t]
                run.replay(calls)
        finally:
            stats.close()
        w_max = {n: weight_channel_max(m.weight) for n, m in layers.items()}

        def smooth_for(name: str, r: int, a: Any) -> torch.Tensor | None:
            return None if a is None else smoothing_factors(stats.act[name][r], w_max[name], float(a))

        trial = _Trial(model, layers)
        chosen_alpha: list[Any] = []
        errors: dict[str, list] = {"alpha_search": [], "mixed_precision": [], "final": []}
        for r, (a, b) in enumerate(spans):
            calls = [c for t in range(a, b) for c in steps[t]]
            if alphas[r] != "search":
                chosen_alpha.append(alphas[r])
                continue
            scored = []
            for cand in progress(list(alpha_grid), desc=f"viditq: alpha search, range {r}", unit="alpha"):
                err = trial.error(run, calls, {n: (bits, smooth_for(n, r, cand)) for n in layers})
                scored.append((err, cand))
            best = min(scored, key=lambda e: e[0])
            chosen_alpha.append(best[1])
            errors["alpha_search"].append({"range": r, "scores": [[c, round(e, 8)] for e, c in scored]})

        bits_of: list[dict[str, int]] = [{n: bits for n in layers} for _ in spans]
        if mixed_precision:
            groups: dict[str, list[str]] = {}
            for n in layers:
                groups.setdefault(_group(n), []).append(n)
            size = {g: sum(layers[n].weight.numel() for n in ns) for g, ns in groups.items()}
            total = sum(size.values())
            for r, (a, b) in enumerate(spans):
                calls = [c for t in range(a, b) for c in steps[t]]
                sens = {}
                for g, ns in progress(list(groups.items()), desc=f"viditq: sensitivity, range {r}", unit="group"):
                    sens[g] = trial.error(run, calls, {n: (4 if n in ns else 8, smooth_for(n, r, chosen_alpha[r]))
                                                       for n in layers})
                kept = 0
                for g in sorted(groups, key=lambda g: sens[g] / size[g], reverse=True):
                    if kept + size[g] <= mixed_precision * total:
                        kept += size[g]
                        for n in groups[g]:
                            bits_of[r][n] = 8
                errors["mixed_precision"].append({"range": r, "sensitivity": {g: round(e, 8) for g, e in sens.items()},
                                                  "w8_groups": sorted(g for g in groups if bits_of[r][groups[g][0]] == 8),
                                                  "w8_fraction": round(kept / total, 6)})

        plan_layers: dict[str, LayerPlan] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, lin in progress(list(layers.items()), desc="viditq: quantize weights", unit="layer"):
            variants: list[Variant] = []
            keys: list[Any] = []
            per_range = []
            for r in range(len(spans)):
                key = (bits_of[r][name], None if chosen_alpha[r] is None else r)
                if key not in keys:
                    keys.append(key)
                    variants.append(Variant(key[0], chosen_alpha[r] is not None))
                    v = len(variants) - 1
                    smooth = smooth_for(name, r, chosen_alpha[r])
                    qw, ws = quantize_weight(lin.weight, key[0], smooth)
                    tensors[f"{name}.variants.{v}.qweight"] = qw.cpu()
                    tensors[f"{name}.variants.{v}.wscale"] = ws.cpu()
                    if smooth is not None:
                        tensors[f"{name}.variants.{v}.smooth"] = smooth.cpu()
                per_range.append(keys.index(key))
            if lin.bias is not None:
                tensors[f"{name}.bias"] = lin.bias.detach().cpu().clone()
            plan_layers[name] = LayerPlan(lin.in_features, lin.out_features, lin.bias is not None, variants, per_range)

        for r, (a, b) in enumerate(spans):  # the final plan's error per range (teacher-forced)
            calls = [c for t in range(a, b) for c in steps[t]]
            err = trial.error(run, calls, {n: (bits_of[r][n], smooth_for(n, r, chosen_alpha[r])) for n in layers})
            errors["final"].append(round(err, 8))
    finally:
        probe.detach()

    info = run.info
    meta = {
        "calibrated": datetime.date.today().isoformat(),
        "samples": steps[0][0].step.batch, "calls_per_step": len(steps[0]), "ema": ema,
        "alpha_requested": alpha if not isinstance(alpha, tuple) else list(alpha),
        "mixed_precision": mixed_precision, "keep_float": list(keep_float),
        "teacher_forced_relative_error_per_range": errors["final"],
        **({"alpha_search": errors["alpha_search"]} if errors["alpha_search"] else {}),
        **({"mixed_precision_choice": errors["mixed_precision"]} if errors["mixed_precision"] else {}),
    }
    plan = Plan(Identity(run.architecture, info.family, len(session.blocks)), n_steps, spans, scheme,
                chosen_alpha, plan_layers, meta)
    return ViDiTQCheckpoint(plan, tensors, run.denoiser_writer())

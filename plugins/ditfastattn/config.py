"""DiTFastAttn's options and its artifact: the plan, which attention computation every attention module
does at every denoising step.

Options: :class:`DiTFastAttnConfig` (``overdrive.diffusers.enable(pipe, "ditfastattn", ...)``).

A plan is a JSON file (``format: overdrive-ditfastattn-plan``) with the model identity it was
calibrated for and one entry per (step, block). An entry is either a v1 block method

* ``"full"`` — full attention;
* ``"ast"``  — attention sharing across timesteps: the module's output at the previous step is reused;
* ``"asc"``  — attention sharing across the CFG halves: one half is computed, the other reuses it;
* ``"wars"`` — window attention plus the residual (full − window) cached at the module's last full step;
* ``"wars+asc"`` — both;

or a v2 list of per-head codes: ``"full"``, ``"share"`` (the head's attention output at the previous
step is reused) or ``"arrow:K"`` (text rows and columns full, vision-vision band of half-width
``ceil(N_vis / (2K))``), optionally as ``{"heads": [...], "asc": true}``.

Everything else (what each entry costs, what has to be cached for later steps) is derived here, so
the runtime and the calibrator share one reading of a plan.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from overdrive.config import ConfigError, MethodConfig, atomic_write_text, read_json

FORMAT = "overdrive-ditfastattn-plan"
VERSION = 1
V1_METHODS = ("full", "ast", "asc", "wars", "wars+asc")
ARROW_KS = (8, 16, 32)
V1_DEFAULT_THRESHOLD = 0.05  # calibration defaults (v1 loss threshold, v2 error budget)
V2_DEFAULT_ALPHA = 0.2


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a plan was calibrated for; a plan applies only to a model and call that match it."""

    architecture: str   # denoiser class name
    family: str
    blocks: int         # attention modules the plan covers (in DenoiserInfo block order)
    heads: int
    head_dim: int
    vision_tokens: int  # image/video tokens per sample (fixes the resolution / frame count)
    text_tokens: int    # text tokens inside the same attention (MMDiT), 0 otherwise
    steps: int          # denoising steps

    def mismatch(self, other: "Identity", source: str) -> None:
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                what = {"vision_tokens": " (a different resolution or frame count)",
                        "steps": " (a different num_inference_steps)"}.get(f.name, "")
                raise ConfigError(
                    f"{source}: DiTFastAttn plan was calibrated for {f.name}={a}, but this model/call has "
                    f"{f.name}={b}{what}; calibrate a plan for this setting "
                    "(overdrive calibrate --method ditfastattn)")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One attention module at one step, normalised.

    skip         reuse the module's previous-step output (AST); nothing is computed
    asc          under CFG compute one half and reuse it for the other
    window       per-head vision band half-width in tokens; -1 = full attention for that head
    share_heads  per head: reuse that head's previous-step attention output
    residual     add the residual (full − window) cached at the module's last full step
    """

    skip: bool = False
    asc: bool = False
    window: tuple[int, ...] | None = None
    share_heads: tuple[bool, ...] | None = None
    residual: bool = False

    @property
    def is_full(self) -> bool:
        return not (self.skip or self.asc or self.residual or self.share_heads and any(self.share_heads)
                    or self.window is not None and any(w >= 0 for w in self.window))

    @property
    def needs_attention_hook(self) -> bool:
        return not self.skip and not self.is_full


FULL = Entry()


def band_for(k: int, vision_tokens: int) -> int:
    """v2's arrow band half-width for divisor ``k``: ceil(N_vis / (2k))."""
    return max(0, math.ceil(vision_tokens / (2 * k)))


def parse_entry(raw: Any, heads: int, vision_tokens: int, window: int, where: str) -> Entry:
    """Turn one plan entry (a v1 method string or v2 per-head list) into an :class:`Entry`."""
    if isinstance(raw, str):
        if raw not in V1_METHODS:
            raise ConfigError(f"{where}: unknown method {raw!r}; expected one of {list(V1_METHODS)} "
                              "or a list of per-head codes")
        if raw == "full":
            return FULL
        if raw == "ast":
            return Entry(skip=True)
        wars = raw.startswith("wars")
        return Entry(asc="asc" in raw, residual=wars, window=(window,) * heads if wars else None)
    asc = False
    if isinstance(raw, dict):
        unknown = set(raw) - {"heads", "asc"}
        if unknown or "heads" not in raw:
            raise ConfigError(f"{where}: a per-head entry is {{'heads': [...], 'asc': bool}}, got keys {sorted(raw)}")
        asc = bool(raw.get("asc", False))
        raw = raw["heads"]
    if not isinstance(raw, list) or len(raw) != heads:
        raise ConfigError(f"{where}: expected {heads} per-head codes, got {raw!r}")
    windows, share = [], []
    for h, code in enumerate(raw):
        if code == "full":
            windows.append(-1); share.append(False)
        elif code == "share":
            windows.append(-1); share.append(True)
        elif isinstance(code, str) and code.startswith("arrow:") and code[6:].isdigit() and int(code[6:]) > 0:
            windows.append(band_for(int(code[6:]), vision_tokens)); share.append(False)
        else:
            raise ConfigError(f"{where}: head {h}: unknown code {code!r}; expected 'full', 'share' or 'arrow:K'")
    return Entry(asc=asc, window=tuple(windows), share_heads=tuple(share) if any(share) else None)


def entry_code(e: Entry, heads: int, vision_tokens: int, window: int) -> Any:
    """Inverse of :func:`parse_entry` for entries the calibrators produce."""
    if e.skip:
        return "ast"
    if e.share_heads is None and (e.window is None or e.window == (window,) * heads and e.residual):
        if e.residual:
            return "wars+asc" if e.asc else "wars"
        return "asc" if e.asc else "full"
    codes = []
    for h in range(heads):
        if e.share_heads and e.share_heads[h]:
            codes.append("share")
        elif e.window is None or e.window[h] < 0:
            codes.append("full")
        else:
            ks = [k for k in ARROW_KS if band_for(k, vision_tokens) == e.window[h]]
            if not ks:
                raise ValueError(f"window {e.window[h]} is no arrow:K band for {vision_tokens} vision tokens")
            codes.append(f"arrow:{ks[0]}")
    return {"heads": codes, "asc": True} if e.asc else codes


class Schedule:
    """What every (step, block) computes, and what a computed step must keep for later steps."""

    steps: int | None = None  # None: unbounded

    def entry(self, step: int, block: int) -> Entry:
        raise NotImplementedError

    def _horizon(self, step: int) -> int:
        return self.steps if self.steps is not None else step + 64

    def keep_output(self, step: int, block: int) -> bool:
        return self.entry(step + 1, block).skip

    def keep_heads(self, step: int, block: int) -> bool:
        """Whether the next step that computes this module's attention shares heads with this one."""
        for t in range(step + 1, self._horizon(step) + 1):
            nxt = self.entry(t, block)
            if not nxt.skip:
                return bool(nxt.share_heads) and any(nxt.share_heads)
        return False

    def residual_window(self, step: int, block: int) -> int | None:
        """At a full step: the window of the first later WA-RS entry before the next full step."""
        for t in range(step + 1, self._horizon(step)):
            e = self.entry(t, block)
            if e.residual:
                return e.window[0]
            if e.is_full:
                return None
        return None


class Uniform(Schedule):
    """One entry for every block from step ``warmup`` on, full attention before."""

    def __init__(self, e: Entry, warmup: int) -> None:
        self.e, self.warmup = e, warmup

    def entry(self, step: int, block: int) -> Entry:
        return FULL if step < self.warmup else self.e

    @classmethod
    def of(cls, method: str, heads: int, vision_tokens: int, window: int, warmup: int, arrow_k: int) -> "Uniform":
        if method == "arrow":
            e = Entry(window=(band_for(arrow_k, vision_tokens),) * heads)
        else:
            e = parse_entry(method, heads, vision_tokens, window, f"method={method!r}")
        return cls(e, warmup)


@dataclasses.dataclass
class Plan(Schedule):
    """A calibrated (or hand-written) DiTFastAttn plan."""

    identity: Identity
    variant: str                         # "v1" or "v2"
    window: int                          # v1 WA-RS half-width in tokens
    entries: list[list[Entry]]           # [step][block]
    meta: dict = dataclasses.field(default_factory=dict)  # calibration settings and predictions

    @property
    def steps(self) -> int:  # type: ignore[override]
        return len(self.entries)

    def entry(self, step: int, block: int) -> Entry:
        return self.entries[step][block] if step < len(self.entries) else FULL

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        ident = self.identity
        return {
            "format": FORMAT, "version": VERSION, "variant": self.variant, "window": self.window,
            "model": dataclasses.asdict(ident),
            "steps": [[entry_code(e, ident.heads, ident.vision_tokens, self.window) for e in row]
                      for row in self.entries],
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    def summary(self) -> str:
        """One line: what the plan is for and its predicted attention cost."""
        ident = self.identity
        text = (f"{ident.architecture} ({ident.family}), {ident.blocks} attention modules x {ident.heads} heads, "
                f"{ident.vision_tokens} vision + {ident.text_tokens} text tokens, {ident.steps} steps; {self.variant}")
        predicted = self.meta.get("predicted_attention_flops_fraction")
        return text + (f" predicted attention FLOPs {predicted:.3f} of full" if predicted is not None else "")

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{source}: not a DiTFastAttn plan (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ConfigError(f"{source}: plan version {data.get('version')!r} is not supported (expected {VERSION})")
        try:
            ident = Identity(**data["model"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source}: \"model\" must give {[f.name for f in dataclasses.fields(Identity)]} ({e})") from None
        window = data.get("window")
        if not isinstance(window, int) or window < 0:
            raise ConfigError(f"{source}: \"window\" must be a non-negative integer (v1 WA-RS half-width in tokens)")
        steps = data.get("steps")
        if not isinstance(steps, list) or len(steps) != ident.steps:
            raise ConfigError(f"{source}: \"steps\" must list {ident.steps} steps of entries")
        entries = []
        for t, row in enumerate(steps):
            if not isinstance(row, list) or len(row) != ident.blocks:
                raise ConfigError(f"{source}: step {t} must list {ident.blocks} block entries")
            entries.append([parse_entry(raw, ident.heads, ident.vision_tokens, window, f"{source}: step {t} block {b}")
                            for b, raw in enumerate(row)])
        plan = cls(ident, str(data.get("variant", "v1")), window, entries, dict(data.get("meta", {})))
        plan.check_causal(source)
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        return cls.from_dict(read_json(path, "no such DiTFastAttn plan file"), str(Path(path)))

    def check_causal(self, source: str = "plan") -> None:
        """Reuse needs something to reuse: step 0 computes everything, WA-RS needs an earlier full step."""
        for b in range(self.identity.blocks):
            e0 = self.entry(0, b)
            if e0.skip or e0.residual or e0.share_heads:
                raise ConfigError(f"{source}: step 0 block {b} reuses an earlier step; step 0 has none")
            seen_full = e0.is_full
            for t in range(1, len(self.entries)):
                e = self.entry(t, b)
                if e.residual and not seen_full:
                    raise ConfigError(f"{source}: step {t} block {b} uses WA-RS before any full step of that block")
                seen_full = seen_full or e.is_full


def flops_fraction(entries: Sequence[Sequence[Entry]], heads: int, s_total: int, text: tuple[int, int],
                   head_dim: int, cfg: bool) -> float:
    """Attention FLOPs of a plan relative to full attention (exact allowed-pair counts, per sample).

    Under CFG, ASC entries cost half. Extra work is counted too: a full step that prepares a residual
    for a later WA-RS step also computes the window attention.
    """
    import torch

    from overdrive.kernels import attention_flops

    full_head = s_total * s_total * 4 * head_dim
    band: dict[int, int] = {}

    def head_cost(w: int) -> int:
        if w < 0 or w >= s_total - 1:
            return full_head
        if w not in band:
            band[w] = attention_flops(s_total, head_dim, torch.tensor([w]), *text)
        return band[w]

    plan = Plan(Identity("", "", len(entries[0]) if entries else 0, heads, head_dim, 0, 0, len(entries)),
                "", 0, [list(r) for r in entries])
    total = done = 0.0
    for t, row in enumerate(entries):
        for b, e in enumerate(row):
            total += full_head * heads
            if e.skip:
                continue
            cost = sum(0 if (e.share_heads and e.share_heads[h]) else head_cost(e.window[h] if e.window else -1)
                       for h in range(heads))
            if e.is_full:
                rw = plan.residual_window(t, b)
                if rw is not None:
                    cost += heads * head_cost(rw)
            done += cost / 2 if (e.asc and cfg) else cost
    return done / total if total else 1.0


# --------------------------------------------------------------------------------- options
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

"""The MoA plan: per-layer, per-KV-head elastic spans (alpha, beta), the sink, the model identity.

What ``overdrive calibrate --method moa`` writes and every runtime reads (the transformers span cache,
the vLLM and SGLang backends). JSON, versioned, validated on load::

    {
      "format": "overdrive.moa.plan", "version": 1,
      "model": {"architecture": "LlamaForCausalLM", "num_layers": 32, "num_attention_heads": 32,
                "num_kv_heads": 8, "head_size": 128},
      "sink": 64, "min_span": 128, "density": 0.5,
      "layers": [{"alpha": [...one per KV head...], "beta": [...one per KV head...]}, ...one per layer...],
      "calibration": {...how it was made (informational)...}
    }

Rule (the KV-cache contract's ``HeadSpans``): a query that is the ``N``-th token of its sequence reads,
in KV head ``h`` of layer ``l``, the first ``sink`` positions and the most recent ``S - sink`` ones with
``S = min(N, max(min_span, ceil(alpha[l][h] + beta[l][h] * N)))``. One span per KV head: under GQA the
query heads of a group share it (MoA's reference converts GQA models to MHA instead). ``density`` is the
calibration's target (the fraction of causal attention entries read at the calibration lengths).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from overdrive.config import ConfigError, MethodConfig
from overdrive.contracts.kv_cache import HeadSpans, ModelIdentity

FORMAT = "overdrive.moa.plan"


@dataclasses.dataclass
class MoAPlan(MethodConfig):
    """A MoA plan (format in the module docstring)."""

    VERSION = 1
    format: str = FORMAT
    model: dict = dataclasses.field(default_factory=dict)
    sink: int = 64
    min_span: int = 128
    density: float = 0.0
    layers: list = dataclasses.field(default_factory=list)
    calibration: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.format != FORMAT:
            raise ConfigError(f"MoAPlan.format must be {FORMAT!r}, got {self.format!r} (not a MoA plan)")
        ident = self.identity
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ConfigError(f"MoAPlan.sink must be an integer >= 0, got {self.sink!r}")
        if not isinstance(self.min_span, int) or self.min_span < max(1, self.sink):
            raise ConfigError(f"MoAPlan.min_span must be an integer >= max(1, sink = {self.sink}), got {self.min_span!r}")
        if not isinstance(self.density, (int, float)) or not 0.0 <= float(self.density) <= 1.0:
            raise ConfigError(f"MoAPlan.density must be in [0, 1], got {self.density!r}")
        if not isinstance(self.layers, list) or len(self.layers) != ident.num_layers:
            n = len(self.layers) if isinstance(self.layers, list) else type(self.layers).__name__
            raise ConfigError(f"MoAPlan.layers: {n} entries for a model of {ident.num_layers} layers")
        for i, layer in enumerate(self.layers):
            self._check_layer(i, layer, ident.num_kv_heads)

    @staticmethod
    def _check_layer(i: int, layer: Any, heads: int) -> None:
        where = f"MoAPlan.layers[{i}]"
        if not isinstance(layer, dict):
            raise ConfigError(f"{where} must be an object with 'alpha' and 'beta', got {type(layer).__name__}")
        unknown = set(layer) - {"alpha", "beta", "loss"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (expected alpha, beta)")
        for key in ("alpha", "beta"):
            vals = layer.get(key)
            if not isinstance(vals, list) or len(vals) != heads:
                raise ConfigError(f"{where}.{key} must be a list of {heads} numbers (one per KV head), got {vals!r}")
            for h, x in enumerate(vals):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                    raise ConfigError(f"{where}.{key}[{h}] must be a finite number, got {x!r}")
                if key == "beta" and not 0.0 <= x <= 1.0:
                    raise ConfigError(f"{where}.beta[{h}] must be in [0, 1] (a span grows by at most one position "
                                      f"per token), got {x!r}")

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_dict(self.model, source="MoAPlan.model")

    def check_model(self, model: ModelIdentity, source: str = "MoA plan") -> None:
        self.identity.check(model, source=source)

    def head_spans(self, layer: int) -> HeadSpans:
        entry = self.layers[layer]
        return HeadSpans(tuple(float(a) for a in entry["alpha"]), tuple(float(b) for b in entry["beta"]),
                         self.min_span)

    def density_at(self, length: int) -> float:
        """Fraction of the causal attention entries of a ``length``-token sequence read, over layers and KV heads."""
        per = [d for i in range(len(self.layers)) for d in self.head_spans(i).density(length, self.sink)]
        return sum(per) / len(per)


def make_plan(model: ModelIdentity, alphas: Sequence[Sequence[float]], betas: Sequence[Sequence[float]], *,
              sink: int = 64, min_span: int = 128, density: float = 0.0, losses: Sequence[Sequence[float]] | None = None,
              calibration: dict | None = None) -> MoAPlan:
    """A plan from per-layer, per-KV-head alphas and betas (validated)."""
    layers = []
    for i, (a, b) in enumerate(zip(alphas, betas)):
        entry: dict[str, Any] = {"alpha": [float(x) for x in a], "beta": [float(x) for x in b]}
        if losses is not None:
            entry["loss"] = [float(x) for x in losses[i]]
        layers.append(entry)
    return MoAPlan(model=model.to_dict(), sink=int(sink), min_span=int(min_span), density=float(density), layers=layers,
                   calibration=calibration or {})


def uniform_plan(model: ModelIdentity, alpha: float, beta: float, *, sink: int = 64, min_span: int = 128,
                 density: float = 0.0, calibration: dict | None = None) -> MoAPlan:
    """Every head with the same span: ``beta = 0`` is StreamingLLM's fixed sink + sliding window."""
    shape = [[alpha] * model.num_kv_heads for _ in range(model.num_layers)]
    return make_plan(model, shape, [[beta] * model.num_kv_heads for _ in range(model.num_layers)], sink=sink,
                     min_span=min_span, density=density, calibration=calibration)


def mean_span(plan: MoAPlan, length: int) -> float:
    """Mean over layers and KV heads of ``S(length)``: positions a query at that length reads."""
    n = torch.tensor(length)
    return float(torch.stack([plan.head_spans(i).spans(n).double() for i in range(len(plan.layers))]).mean())


def matched_baselines(plan: MoAPlan, ident: ModelIdentity, length: int) -> dict[str, MoAPlan]:
    """Uniform plans whose query at ``length`` reads (on average over heads) as many positions as the plan's:
    a fixed window (StreamingLLM) and an elastic span with alpha = 0 (``beta = mean span / length``)."""
    target = mean_span(plan, length)
    window = float(round(target))
    return {"streamingllm": uniform_plan(ident, window, 0.0, sink=plan.sink, min_span=plan.min_span),
            "uniform-elastic": uniform_plan(ident, 0.0, min(1.0, target / length), sink=plan.sink,
                                            min_span=plan.min_span)}


# ------------------------------------------------------------------------------ calibration options
TARGETS = ("dense", "text")


@dataclasses.dataclass
class CalibOptions:
    density: float = 0.5
    max_len: int = 0  # 0: min(max_position_embeddings, 16384)
    lengths: tuple[int, ...] = ()  # (): (M/4, M/2)
    validate_length: int = 0  # 0: 3M/4
    samples: int = 2
    batch_size: int = 1
    response_tokens: int = 0  # 0: min(64, shortest length / 8)
    target: str = "dense"  # "dense": the dense model's greedy answer (MoA); "text": the text's own continuation
    sink: int = 64
    min_span: int = 128
    alpha_step: int = 0  # 0: M / 16
    betas: int = 9
    data: str = "builtin"

    def resolve(self, max_positions: int) -> "CalibOptions":
        """Fill the length defaults from the model's context and check everything (ConfigError names the option)."""
        o = dataclasses.replace(self)
        if not 0.0 < o.density <= 1.0:
            raise ConfigError(f"--density must be in (0, 1], got {o.density}")
        if o.max_len <= 0:
            o.max_len = min(int(max_positions), 16384)
        if o.max_len > max_positions:
            raise ConfigError(f"--max-len {o.max_len} exceeds the model's context ({max_positions} positions)")
        if not o.lengths:
            o.lengths = (o.max_len // 4, o.max_len // 2)
        if o.validate_length <= 0:
            o.validate_length = 3 * o.max_len // 4
        if o.alpha_step <= 0:
            o.alpha_step = max(1, o.max_len // 16)
        if o.target not in TARGETS:
            raise ConfigError(f"--target must be one of {TARGETS}, got {o.target!r}")
        if o.response_tokens <= 0:
            o.response_tokens = max(1, min(64, min(o.lengths) // 8))
        for name, n in [("--lengths", x) for x in o.lengths] + [("--validate-length", o.validate_length)]:
            if not o.response_tokens < n <= o.max_len:
                raise ConfigError(f"{name} {n} must be above --response-tokens ({o.response_tokens}) and at most "
                                  f"--max-len ({o.max_len})")
        if o.validate_length in o.lengths:
            raise ConfigError(f"--validate-length {o.validate_length} must differ from the profile lengths "
                              f"{list(o.lengths)} (validation is at an unseen length)")
        if o.sink < 0 or o.min_span < max(1, o.sink):
            raise ConfigError(f"--min-span ({o.min_span}) must be >= max(1, --sink = {o.sink})")
        if o.samples < 1 or o.batch_size < 1 or o.betas < 2:
            raise ConfigError(f"--samples ({o.samples}) and --batch-size ({o.batch_size}) must be >= 1, --betas "
                              f"({o.betas}) >= 2")
        return o

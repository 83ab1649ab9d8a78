"""ViDiT-Q's options (:class:`ViDiTQConfig`) and its artifact, the plan: which weights every quantized
linear layer uses in every timestep range.

A plan lives in the quantized denoiser's ``config.json`` as its ``quantization_config``
(``quant_method: "viditq"``, ``format: "overdrive-viditq"``), next to the quantized tensors
(docs/methods/viditq.md has the format tensor by tensor). It holds

* the model identity it was calibrated for (denoiser class, family, blocks) and the step count;
* the timestep ranges: contiguous step-index ranges ``[start, stop)`` covering ``0 .. steps``;
* per quantized layer, its weight *variants* (bits 4/8, channel-balanced or not) and which variant
  each range uses. A layer whose ranges share a variant stores it once.

The step index (not the timestep value) selects the range: pipelines scale timesteps differently
(Flux passes t/1000), and ViDiT-Q's own plans (mixed precision per group of steps) are tied to a
sampler step count, so a plan applies only to runs of the step count it was calibrated for.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from overdrive.config import ConfigError, MethodConfig

NAME = "viditq"
FORMAT = "overdrive-viditq"
VERSION = 1
SCHEMES = {"w8a8": 8, "w4a8": 4}
DEFAULT_ALPHA_GRID = (None, 0.1, 0.25, 0.5, 0.75)  # calibration defaults: alpha search candidates,
DEFAULT_EMA = 0.95                                # EMA factor of the activation channel maxima


@dataclasses.dataclass(frozen=True)
class Variant:
    """One stored weight set of a layer: ``bits`` per weight, ``smooth`` = a channel-balancing divisor."""

    bits: int
    smooth: bool


@dataclasses.dataclass
class LayerPlan:
    in_features: int
    out_features: int
    bias: bool
    variants: list[Variant]
    ranges: list[int]  # variant index per timestep range

    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (codes, scales, smoothing divisors), not the bias."""
        total = 0
        for v in self.variants:
            codes = self.out_features * self.in_features if v.bits == 8 else self.out_features * (-(-self.in_features // 8)) * 4
            total += codes + 4 * self.out_features + (4 * self.in_features if v.smooth else 0)
        return total


@dataclasses.dataclass(frozen=True)
class Identity:
    architecture: str  # denoiser class name
    family: str
    blocks: int        # transformer blocks (DenoiserInfo order)


@dataclasses.dataclass
class Plan:
    identity: Identity
    steps: int
    ranges: list[tuple[int, int]]
    scheme: str
    alpha: list[float | None]         # channel-balancing alpha per range (None: no balancing)
    layers: dict[str, LayerPlan]
    meta: dict = dataclasses.field(default_factory=dict)

    def range_of(self, step: int) -> int:
        for r, (a, b) in enumerate(self.ranges):
            if a <= step < b:
                return r
        raise ConfigError(f"ViDiT-Q plan covers steps 0..{self.steps - 1}, got step {step}")

    def weight_bytes(self) -> int:
        return sum(lp.weight_bytes() for lp in self.layers.values())

    def summary(self) -> str:
        variants = sum(len(lp.variants) for lp in self.layers.values())
        bits = sorted({v.bits for lp in self.layers.values() for v in lp.variants})
        return (f"{self.identity.architecture} ({self.identity.family}), {self.scheme.upper()}, {len(self.layers)} "
                f"quantized linear layers ({variants} weight sets, bits {bits}), {self.steps} steps in "
                f"{len(self.ranges)} ranges {self.ranges}, alpha {self.alpha}; "
                f"{self.weight_bytes() / 2**20:.2f} MiB of quantized weights")

    # -- quantization_config <-> Plan ----------------------------------------------------------
    def to_quantization_config(self) -> dict[str, Any]:
        return {
            "quant_method": NAME, "format": FORMAT, "version": VERSION, "scheme": self.scheme,
            "model": dataclasses.asdict(self.identity), "steps": self.steps,
            "ranges": [list(r) for r in self.ranges], "alpha": list(self.alpha),
            "layers": {name: {"in": lp.in_features, "out": lp.out_features, "bias": lp.bias,
                              "variants": [[v.bits, v.smooth] for v in lp.variants], "ranges": list(lp.ranges)}
                       for name, lp in self.layers.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_quantization_config(cls, data: Any, source: str = "quantization_config") -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ConfigError(f"{source}: not a ViDiT-Q plan (expected \"format\": \"{FORMAT}\")")
        if data.get("quant_method") != NAME:
            raise ConfigError(f"{source}: quant_method is {data.get('quant_method')!r}, expected {NAME!r}")
        if data.get("version") != VERSION:
            raise ConfigError(f"{source}: ViDiT-Q plan version {data.get('version')!r} is not supported (expected {VERSION})")
        try:
            ident = Identity(**data["model"])
            steps = int(data["steps"])
            ranges = [tuple(int(x) for x in r) for r in data["ranges"]]
            scheme, alpha, layers_raw = data["scheme"], list(data["alpha"]), data["layers"]
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: a ViDiT-Q plan needs model {{architecture, family, blocks}}, steps, ranges, "
                              f"scheme, alpha and layers ({type(e).__name__}: {e})") from None
        if scheme not in SCHEMES:
            raise ConfigError(f"{source}: scheme {scheme!r} is not one of {sorted(SCHEMES)}")
        check_ranges(ranges, steps, source)
        if len(alpha) != len(ranges):
            raise ConfigError(f"{source}: alpha lists {len(alpha)} values for {len(ranges)} timestep ranges")
        if not isinstance(layers_raw, Mapping) or not layers_raw:
            raise ConfigError(f"{source}: layers must map layer names to their plans (none given)")
        layers = {}
        for name, raw in layers_raw.items():
            where = f"{source}: layer {name!r}"
            try:
                variants = [Variant(int(b), bool(s)) for b, s in raw["variants"]]
                lp = LayerPlan(int(raw["in"]), int(raw["out"]), bool(raw["bias"]), variants, [int(i) for i in raw["ranges"]])
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{where}: expected {{in, out, bias, variants: [[bits, smooth], ...], ranges: [...]}} "
                                  f"({type(e).__name__}: {e})") from None
            if any(v.bits not in (4, 8) for v in variants):
                raise ConfigError(f"{where}: variant bits must be 4 or 8, got {[v.bits for v in variants]}")
            if len(lp.ranges) != len(ranges) or any(not 0 <= i < len(variants) for i in lp.ranges):
                raise ConfigError(f"{where}: ranges must give one variant index (0..{len(variants) - 1}) for each of "
                                  f"the {len(ranges)} timestep ranges, got {lp.ranges}")
            layers[name] = lp
        return cls(ident, steps, [tuple(r) for r in ranges], scheme, alpha, layers, dict(data.get("meta", {})))

    # -- checks against a model and a run -------------------------------------------------------
    def check_model(self, architecture: str, blocks: int, linears: Mapping[str, tuple[int, int, bool]],
                    source: str) -> None:
        """Reject a plan for another model: ``linears`` maps the model's layer names to (in, out, bias)."""
        ident = self.identity
        for field, have in (("architecture", architecture), ("blocks", blocks)):
            if getattr(ident, field) != have:
                raise ConfigError(f"{source}: ViDiT-Q checkpoint was calibrated for {field}={getattr(ident, field)!r}, "
                                  f"but this denoiser has {field}={have!r}; calibrate one for this model "
                                  "(overdrive calibrate --method viditq)")
        for name, lp in self.layers.items():
            have = linears.get(name)
            want = (lp.in_features, lp.out_features, lp.bias)
            if have is None:
                raise ConfigError(f"{source}: ViDiT-Q checkpoint quantizes layer {name!r}, which this "
                                  f"{architecture} has no linear layer of; calibrate one for this model")
            if tuple(have) != want:
                raise ConfigError(f"{source}: layer {name!r} is (in, out, bias)={want} in the ViDiT-Q checkpoint but "
                                  f"{tuple(have)} in this {architecture}; calibrate one for this model")

    def check_steps(self, num_steps: int | None, step: int, source: str) -> None:
        if num_steps is not None and num_steps != self.steps:
            raise ConfigError(f"{source}: ViDiT-Q checkpoint was calibrated for steps={self.steps}, but this run has "
                              f"num_inference_steps={num_steps}; its timestep ranges {self.ranges} are step ranges of "
                              "that schedule: calibrate for this step count")
        if step >= self.steps:
            raise ConfigError(f"{source}: ViDiT-Q checkpoint covers {self.steps} steps, this run reached step "
                              f"{step + 1}; calibrate for this step count")


def check_ranges(ranges: list[tuple[int, ...]], steps: int, source: str) -> None:
    if steps < 1:
        raise ConfigError(f"{source}: steps must be >= 1, got {steps}")
    ok = bool(ranges) and ranges[0][0] == 0 and ranges[-1][-1] == steps and all(
        len(r) == 2 and r[0] < r[1] for r in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if not ok:
        raise ConfigError(f"{source}: timestep ranges {ranges} must be non-empty [start, stop) step ranges that tile "
                          f"0..{steps} in order")


def split_steps(steps: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous step ranges of (nearly) equal length covering ``0 .. steps``."""
    if not 1 <= n <= steps:
        raise ConfigError(f"--ranges {n}: need between 1 and the step count ({steps}) timestep ranges")
    bounds = [round(i * steps / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


# --------------------------------------------------------------------------------- options
@dataclasses.dataclass
class ViDiTQConfig(MethodConfig):
    """How ViDiT-Q is attached to a pipeline.

    checkpoint  a ViDiT-Q checkpoint (the pipeline or denoiser directory written by
                ``overdrive calibrate --method viditq``) to apply to a float pipeline: its quantized
                layers replace the float ones, which are kept for ``disable()`` (exact restore, no
                memory saved). Empty: the denoiser was loaded quantized with
                ``DiffusionPipeline.from_pretrained`` (memory saved); ``enable`` then binds the
                pipeline so each run's step count is checked before its first step.
    """

    VERSION = 1
    checkpoint: str = ""

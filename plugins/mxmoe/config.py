"""MxMoE's formats, its checkpoint config (the plan) and its validation.

A *format* is one of

* ``w{b}g{g}``: weight-only, ``b`` in 2, 3, 4, 8 bits, asymmetric, one float16 scale and one uint8
  zero code per group of ``g`` (32, 64, 128) input channels: ``W = (code - zero) * scale`` (MBQ's
  weight-only grid, so :mod:`overdrive.mbq.gptq` quantizes it);
* ``w8a8`` / ``w4a4``: weight and activation quantization, symmetric per-output-channel weights
  (float16 scale) and per-token dynamic symmetric activations of the same width
  (``scale = max|x| / qmax``, round half away from zero, ``qmax = 127`` / ``7``).

The plan (:class:`MxMoEConfig`, written as config.json ``quantization_config`` with
``quant_method: "mxmoe"``) gives a format to every (MoE layer, expert, linear) with linear in
``gate``, ``up``, ``down``; the model identity it was made for; the average-bits budget per MoE
layer it must meet (expert weights only: attention, routers and shared experts stay in the
checkpoint's dtype). Storage cost per weight of a format: its code bits plus its scale/zero bits
spread over the group (``w4g128``: 4 + 24/128 = 4.1875); W-A formats: bits + 16/K.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Mapping

from overdrive.config import ConfigError, MethodConfig

#: the three linears of an expert (gate/up read the hidden state, down reads the intermediate)
LINEARS = ("gate", "up", "down")
WEIGHT_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 192)
WA_FORMATS = {"w8a8": 8, "w4a4": 4}
QUANTIZERS = ("rtn", "gptq")
#: the candidate set the allocation chooses from by default
DEFAULT_CANDIDATES = ("w2g64", "w2g128", "w3g64", "w3g128", "w4g64", "w4g128", "w8g128", "w8a8", "w4a4")
_WO = re.compile(r"^w([0-9]+)g([0-9]+)$")


@dataclasses.dataclass(frozen=True)
class Format:
    """One quantization format (see the module docstring)."""

    name: str
    bits: int
    group_size: int | None  # None: per output channel (W-A formats)
    act_bits: int = 16

    @property
    def weight_only(self) -> bool:
        return self.act_bits == 16

    def bits_per_weight(self, in_features: int) -> float:
        if self.weight_only:
            return self.bits + 24.0 / self.group_size  # float16 scale + uint8 zero per group
        return self.bits + 16.0 / in_features  # float16 scale per output channel

    def check_shape(self, in_features: int, where: str) -> None:
        if self.group_size and in_features % self.group_size:
            raise ConfigError(f"{where}: format {self.name} needs input features divisible by {self.group_size}, "
                              f"got {in_features}")


def parse_format(name: str, where: str = "format") -> Format:
    """A format by name; ConfigError naming the known ones otherwise."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: format must be a string, got {name!r}")
    if name in WA_FORMATS:
        return Format(name, WA_FORMATS[name], None, WA_FORMATS[name])
    m = _WO.match(name)
    if m and int(m.group(1)) in WEIGHT_BITS and int(m.group(2)) in GROUP_SIZES:
        return Format(name, int(m.group(1)), int(m.group(2)))
    raise ConfigError(f"{where}: unknown format {name!r}; known: w{{b}}g{{g}} with b in {list(WEIGHT_BITS)} and g in "
                      f"{list(GROUP_SIZES)}, or {sorted(WA_FORMATS)}")


def linear_shape(linear: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """(out, in) features of an expert linear."""
    return (hidden, intermediate) if linear == "down" else (intermediate, hidden)


#: the identity fields a plan records (overdrive.contracts.expert_pruning.MoEIdentity's, as a dict)
IDENTITY_FIELDS = ("architecture", "num_layers", "moe_layers", "num_experts", "top_k", "hidden_size",
                   "expert_intermediate_size", "renormalize", "shared_expert")


@dataclasses.dataclass
class MxMoEConfig(MethodConfig):
    """A checkpoint's MxMoE plan (config.json ``quantization_config`` less ``quant_method``).

    avg_bits   the budget: average storage bits per expert weight, per MoE layer
    quantizer  how codes were chosen: rtn or gptq (recorded)
    r          the accuracy/speed trade-off the plan was solved at (1: accuracy only; recorded)
    identity   the model the plan was made for (MoEIdentity fields)
    formats    {layer: {expert: {"gate"|"up"|"down": format}}} (JSON keys are strings)
    pareto     the r sweep: [{"r", "loss", "time", "avg_bits"}] per layer summed (recorded)
    cost_device  the device the time model's kernel cost table was measured on (recorded)
    """

    VERSION: ClassVar[int] = 1
    avg_bits: float = 4.25
    quantizer: str = "gptq"
    r: float = 1.0
    identity: dict = dataclasses.field(default_factory=dict)
    formats: dict = dataclasses.field(default_factory=dict)
    pareto: list = dataclasses.field(default_factory=list)
    cost_device: str = ""

    def validate(self) -> None:
        if isinstance(self.avg_bits, int) and not isinstance(self.avg_bits, bool):
            self.avg_bits = float(self.avg_bits)
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"mxmoe quantizer must be one of {list(QUANTIZERS)}, got {self.quantizer!r}")
        if not 0.0 <= float(self.r) <= 1.0:
            raise ConfigError(f"mxmoe r must be in [0, 1], got {self.r}")
        missing = [f for f in IDENTITY_FIELDS if f not in self.identity]
        if missing:
            raise ConfigError(f"mxmoe plan: identity lacks {missing}")
        ident = self.identity
        layers = [int(l) for l in ident["moe_layers"]]
        keys = {int(k) for k in self.formats}
        if keys != set(layers):
            raise ConfigError(f"mxmoe plan: formats cover layers {sorted(keys)}, the model's MoE layers are {layers}")
        h, i, e = int(ident["hidden_size"]), int(ident["expert_intermediate_size"]), int(ident["num_experts"])
        for layer in layers:
            per = self.formats.get(str(layer), self.formats.get(layer))
            if not isinstance(per, Mapping) or {int(x) for x in per} != set(range(e)):
                raise ConfigError(f"mxmoe plan: layer {layer} must give formats for experts 0..{e - 1}")
            used = total = 0.0
            for ex, lin in per.items():
                if not isinstance(lin, Mapping) or set(lin) != set(LINEARS):
                    raise ConfigError(f"mxmoe plan: layer {layer} expert {ex} must give formats for {list(LINEARS)}")
                for name, fmt in lin.items():
                    where = f"mxmoe plan layer {layer} expert {ex} {name}"
                    f = parse_format(fmt, where)
                    n, k = linear_shape(name, h, i)
                    f.check_shape(k, where)
                    used += f.bits_per_weight(k) * n * k
                    total += n * k
            if used / total > self.avg_bits + 1e-9:
                raise ConfigError(f"mxmoe plan: layer {layer} uses {used / total:.4f} bits per expert weight, over the "
                                  f"budget avg_bits={self.avg_bits}")

    def format_of(self, layer: int, expert: int, linear: str) -> Format:
        per = self.formats.get(str(layer), self.formats.get(layer))
        lin = per.get(str(expert), per.get(expert))
        return parse_format(lin[linear])

    def layer_bits(self, layer: int) -> float:
        ident = self.identity
        h, i = int(ident["hidden_size"]), int(ident["expert_intermediate_size"])
        used = total = 0.0
        for e in range(int(ident["num_experts"])):
            for lin in LINEARS:
                n, k = linear_shape(lin, h, i)
                used += self.format_of(layer, e, lin).bits_per_weight(k) * n * k
                total += n * k
        return used / total

    def check_identity(self, model: Mapping[str, Any], source: str = "mxmoe checkpoint") -> None:
        """Raise naming every identity field where ``model`` differs from the plan's model."""
        diff = [f"{k}: plan {self.identity.get(k)!r}, model {model.get(k)!r}" for k in IDENTITY_FIELDS
                if _norm(self.identity.get(k)) != _norm(model.get(k))]
        if diff:
            raise ConfigError(f"{source}: the plan was made for another model ({'; '.join(diff)})")

    def histogram(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for per in self.formats.values():
            for lin in per.values():
                for f in lin.values():
                    out[f] = out.get(f, 0) + 1
        return dict(sorted(out.items()))


def _norm(v: Any) -> Any:
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else v


#: checkpoint projection names of an expert's linears -> the linear
CHECKPOINT_LINEARS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
                      "down_proj": "down"}


def projection_names(architecture: str) -> dict[str, str]:
    """linear -> the checkpoint's projection name under ``experts.{e}.`` for an architecture."""
    if architecture.startswith("Mixtral"):
        return {"gate": "w1", "up": "w3", "down": "w2"}
    return {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

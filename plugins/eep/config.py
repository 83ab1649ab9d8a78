"""EEP's options (:class:`EEPConfig`), its plan artifact (:class:`EEPPlan`) and the checkpoint families it
exports (:data:`FAMILIES`: where each architecture keeps its gate and experts in a safetensors checkpoint).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

from overdrive.config import ConfigError, MethodConfig, atomic_write_text, read_json
from overdrive.contracts.expert_pruning import LayerMaps, MoEIdentity, is_discrete

#: how the kept experts are chosen; every strategy writes the same plan format
STRATEGIES = ("eep", "frequency", "reap", "random")


@dataclasses.dataclass
class EEPConfig(MethodConfig):
    """Search options.

    experts            B: experts kept per MoE layer
    active             k: experts active per token (0: the model's own top-k, capped at B)
    strategy           eep (evolutionary search) | frequency | reap | random (one-shot baselines)
    layer_groups       0: one pattern per layer; G > 0: G contiguous groups of layers, each group's
                       pattern applied to every layer in it (fewer variables to search)
    population         individuals per generation
    prune_generations  stage 1: discrete re-pointing of one-hot rows (which experts are kept)
    merge_generations  stage 2: Gaussian mutation and row crossover of the merge/route matrices
    row_mutation       stage 1: probability that one row of a layer's pattern is re-pointed
    noise_prob         stage 2: probability that one matrix entry gets Gaussian noise
    noise_scale        stage 2: standard deviation of that noise
    crossover          probability that a child row comes from the second parent
    elite              best individuals carried unchanged into the next generation
    freeze_route       stage 2 evolves the merge matrix only (the route stays one-hot, so the result
                       still exports as a standard checkpoint)
    seed               everything random (initial population, mutations, baselines) follows it
    """

    VERSION: ClassVar[int] = 1
    experts: int = 0
    active: int = 0
    strategy: str = "eep"
    layer_groups: int = 0
    population: int = 12
    prune_generations: int = 8
    merge_generations: int = 8
    row_mutation: float = 0.3
    noise_prob: float = 0.2
    noise_scale: float = 0.05
    crossover: float = 0.5
    elite: int = 3
    freeze_route: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.experts < 1:
            raise ConfigError(f"experts must be >= 1 (the number of experts kept per layer), got {self.experts}")
        if self.active < 0 or (self.active and self.active > self.experts):
            raise ConfigError(f"active must be 0 (the model's top-k) or in 1..experts={self.experts}, got {self.active}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.layer_groups < 0:
            raise ConfigError(f"layer_groups must be >= 0, got {self.layer_groups}")
        if self.population < 2 or not 1 <= self.elite < self.population:
            raise ConfigError(f"population must be >= 2 and elite in 1..population-1, got population "
                              f"{self.population}, elite {self.elite}")
        if self.prune_generations < 0 or self.merge_generations < 0:
            raise ConfigError("prune_generations and merge_generations must be >= 0")
        for name in ("row_mutation", "noise_prob", "crossover"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.noise_scale < 0:
            raise ConfigError(f"noise_scale must be >= 0, got {self.noise_scale}")


@dataclasses.dataclass
class EEPPlan:
    """The artifact: per MoE layer maps, the model identity, the options and the fitness it reached."""

    identity: MoEIdentity
    layers: dict[int, LayerMaps]
    options: EEPConfig
    fitness: dict[str, float] = dataclasses.field(default_factory=dict)
    search_seconds: float = 0.0
    created: str = ""
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        missing = sorted(set(self.identity.moe_layers) - set(self.layers))
        extra = sorted(set(self.layers) - set(self.identity.moe_layers))
        if missing or extra:
            raise ConfigError(f"EEP plan: maps for MoE layers {missing} are missing" if missing
                              else f"EEP plan: maps for layers {extra} that are not MoE layers")
        for layer, m in self.layers.items():
            if m.num_experts != self.identity.num_experts:
                raise ConfigError(f"EEP plan: layer {layer} maps have {m.num_experts} columns, the model has "
                                  f"{self.identity.num_experts} experts")
        kept = {m.num_kept for m in self.layers.values()}
        if len(kept) != 1:
            raise ConfigError(f"EEP plan: every layer must keep the same number of experts, got {sorted(kept)}")

    @property
    def num_kept(self) -> int:
        return next(iter(self.layers.values())).num_kept

    @property
    def top_k(self) -> int:
        return next(iter(self.layers.values())).top_k

    @property
    def discrete(self) -> bool:
        """Whether the plan is exactly a standard checkpoint with ``num_kept`` experts."""
        return is_discrete(self.layers, self.identity.renormalize)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "method": "eep", "identity": self.identity.to_dict(),
                "options": self.options.to_dict(), "fitness": self.fitness, "search_seconds": self.search_seconds,
                "created": self.created, "discrete": self.discrete,
                "layers": {str(k): v.to_dict() for k, v in sorted(self.layers.items())}}

    def save(self, path: Path) -> Path:
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> "EEPPlan":
        if not isinstance(d, Mapping) or d.get("method") != "eep":
            raise ConfigError(f"{source}: not an EEP plan (expected \"method\": \"eep\")")
        if d.get("version", 0) > cls.VERSION:
            raise ConfigError(f"{source}: plan version {d.get('version')} is newer than this overdrive reads "
                              f"({cls.VERSION}); upgrade overdrive")
        try:
            layers = {int(k): LayerMaps.from_dict(v, f"{source} layer {k}") for k, v in d["layers"].items()}
            return cls(MoEIdentity.from_dict(d["identity"], source), layers,
                       EEPConfig.from_dict(d["options"], source=f"{source} options"),
                       dict(d.get("fitness", {})), float(d.get("search_seconds", 0.0)), str(d.get("created", "")))
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "EEPPlan":
        return cls.from_dict(read_json(path, "EEP plan not found (write one with `overdrive calibrate --method eep`)"),
                             source=str(path))


@dataclasses.dataclass(frozen=True)
class CheckpointFamily:
    """Where an architecture keeps one MoE layer in its safetensors checkpoint, and its config keys."""

    block: str            # "model.layers.{layer}.<block>." prefix of the MoE block's tensors
    projections: tuple[str, str, str]  # (gate/w1, up/w3, down/w2) names under experts.{e}.
    experts_keys: tuple[str, ...]  # config.json keys that may hold the number of experts (first present wins)
    top_k_key: str
    renormalize_key: str | None  # config key of norm_topk_prob, None: always renormalised

    def experts_key(self, config: Mapping[str, Any]) -> str:
        for k in self.experts_keys:
            if k in config:
                return k
        raise ConfigError(f"config.json has none of {list(self.experts_keys)} (the number of experts)")

    def expert_tensor(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{proj}.weight"

    def gate_tensor(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"


FAMILIES: dict[str, CheckpointFamily] = {
    "MixtralForCausalLM": CheckpointFamily("block_sparse_moe", ("w1", "w3", "w2"), ("num_local_experts",),
                                           "num_experts_per_tok", None),
    "Qwen2MoeForCausalLM": CheckpointFamily("mlp", ("gate_proj", "up_proj", "down_proj"),
                                            ("num_experts", "num_local_experts"),
                                            "num_experts_per_tok", "norm_topk_prob"),
    "Qwen3MoeForCausalLM": CheckpointFamily("mlp", ("gate_proj", "up_proj", "down_proj"),
                                            ("num_experts", "num_local_experts"),
                                            "num_experts_per_tok", "norm_topk_prob"),
}


def family_of(config: Mapping[str, Any], source: str) -> tuple[str, CheckpointFamily]:
    archs = config.get("architectures") or []
    for a in archs:
        if a in FAMILIES:
            return a, FAMILIES[a]
    raise ConfigError(f"{source}: architecture {archs} is not a supported MoE family; supported: {sorted(FAMILIES)}")

"""The expert-pruning contract (kind ``expert_pruning``): a model transformation that changes the expert
set of every MoE layer.

A sparse MoE layer with ``E`` experts routes each token by ``softmax(gate · x)`` over the experts, keeps
the ``k`` largest and (in Mixtral-style layers) renormalises them to sum to one. An expert-pruning plan
replaces the ``E`` experts of a layer by ``B`` new ones, described by two ``B x E`` matrices
(:class:`LayerMaps`):

* ``merge`` (C): new expert ``b``'s weights are ``sum_e C[b, e] * W_e`` for every projection;
* ``route`` (T): the original routing probabilities ``p`` (softmax over all ``E`` logits) are mapped to
  scores over the new experts by ``s = T p``; the ``k`` largest scores are kept and renormalised
  (or not, as the model does).

When every row of ``T`` is one-hot (new expert ``b`` takes the route of original expert ``e_b``), the
scores are ``p[e_b]``, which are proportional to the softmax over the kept gate rows only; so with
renormalised top-k the pruned layer is *exactly* a standard MoE layer of the same architecture with
``B`` experts: the gate's rows ``e_b`` and the merged experts (:func:`is_discrete`). Without
renormalisation (``norm_topk_prob=False``) the weights differ by the kept probability mass, and only
the continuous runtime is exact.

What a method provides (:class:`ExpertPruningMethod`): a plan from a session. What a driver provides
(:class:`ExpertSession`, implemented once per framework): the model's MoE geometry, the original
experts' weights, evaluation of a candidate set of maps on task data, and routing statistics.
Everything here is torch only.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

from ..config import ConfigError


@dataclasses.dataclass(frozen=True)
class MoEIdentity:
    """What an expert-pruning plan was made for; a plan for another model is rejected."""

    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    renormalize: bool
    shared_expert: bool

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> "MoEIdentity":
        try:
            return cls(**{**d, "moe_layers": tuple(d["moe_layers"])})
        except (TypeError, KeyError) as e:
            raise ConfigError(f"{source}: model identity is malformed ({e})") from None

    def check(self, other: "MoEIdentity", source: str) -> None:
        """Raise naming every field where ``other`` (the model at hand) differs from this plan's model."""
        diff = [f"{f.name}: plan {getattr(self, f.name)!r}, model {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if diff:
            raise ConfigError(f"{source} was made for another model ({'; '.join(diff)})")


@dataclasses.dataclass
class LayerMaps:
    """One MoE layer's maps: ``merge`` and ``route`` are ``(B, E)``; ``top_k`` experts are active."""

    merge: torch.Tensor
    route: torch.Tensor
    top_k: int

    def __post_init__(self) -> None:
        if self.merge.dim() != 2 or self.route.shape != self.merge.shape:
            raise ConfigError(f"LayerMaps: merge and route must both be (B, E), got {tuple(self.merge.shape)} "
                              f"and {tuple(self.route.shape)}")
        if not 1 <= self.top_k <= self.merge.shape[0]:
            raise ConfigError(f"LayerMaps: top_k must be in 1..B={self.merge.shape[0]}, got {self.top_k}")
        if not (torch.isfinite(self.merge).all() and torch.isfinite(self.route).all()):
            raise ConfigError("LayerMaps: merge/route contain non-finite values")

    @property
    def num_kept(self) -> int:
        return self.merge.shape[0]

    @property
    def num_experts(self) -> int:
        return self.merge.shape[1]

    @classmethod
    def select(cls, experts: Sequence[int], num_experts: int, top_k: int) -> "LayerMaps":
        """Plain pruning: keep ``experts`` (in that order) unchanged."""
        m = torch.zeros(len(experts), num_experts, dtype=torch.float64)
        m[torch.arange(len(experts)), torch.as_tensor(list(experts))] = 1.0
        return cls(m.clone(), m, top_k)

    def kept_routes(self) -> list[int] | None:
        """``e_b`` for every row when ``route`` is one-hot per row (the discrete case), else ``None``."""
        return one_hot_rows(self.route)

    def to_dict(self) -> dict[str, Any]:
        return {"merge": self.merge.double().tolist(), "route": self.route.double().tolist(), "top_k": self.top_k}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> "LayerMaps":
        try:
            return cls(torch.tensor(d["merge"], dtype=torch.float64), torch.tensor(d["route"], dtype=torch.float64),
                       int(d["top_k"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: layer maps are malformed ({e})") from None


def one_hot_rows(t: torch.Tensor) -> list[int] | None:
    """Column of the single 1 in every row, or ``None`` if some row is not exactly one-hot."""
    nz = t != 0
    if not bool((nz.sum(dim=1) == 1).all()):
        return None
    cols = nz.float().argmax(dim=1)
    if not bool((t[torch.arange(t.shape[0]), cols] == 1).all()):
        return None
    return [int(c) for c in cols]


def is_discrete(maps: Mapping[int, LayerMaps], renormalize: bool) -> bool:
    """Whether the plan is exactly a standard checkpoint with fewer experts (see the module docstring)."""
    return renormalize and all(m.kept_routes() is not None for m in maps.values())


def merge_experts(weight: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
    """``(E, *shape)`` expert weights -> ``(B, *shape)``: ``out[b] = sum_e merge[b, e] * weight[e]``.

    Accumulates in float32 at least (float64 when given), returns ``weight.dtype``."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    out = torch.einsum("be,e...->b...", merge.to(acc), weight.to(acc))
    return out.to(weight.dtype)


def mapped_routing(logits: torch.Tensor, route: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route ``(N, E)`` gate logits through ``route`` (B x E).

    Returns ``(scores (N, B), weights (N, k), indices (N, k))``: ``scores = softmax(logits) @ route.T``
    in float32 (float64 when given), the ``k`` largest kept, renormalised to sum to one if asked.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(acc), dim=-1)
    scores = probs @ route.to(acc).T
    top, idx = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    return scores, top, idx


def maps_fingerprint(maps: Mapping[int, LayerMaps]) -> str:
    """Short stable hash of a set of maps (for logs and plan identity)."""
    h = hashlib.sha256()
    for layer in sorted(maps):
        h.update(json.dumps([layer, maps[layer].to_dict()], sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class TaskRecord:
    """One scoring example as token ids: the model reads ``prompt`` and is scored on ``answer``."""

    prompt: list[int]
    answer: list[int]


@dataclasses.dataclass
class ExpertStats:
    """Routing statistics of one MoE layer on calibration data (original experts).

    frequency  (E,) fraction of routed (token, slot) pairs that chose each expert
    gate_mass  (E,) mean routing weight each expert received over all tokens
    saliency   (E,) REAP-style: mean over the tokens routed to an expert of routing weight x norm of
               that expert's output
    """

    frequency: torch.Tensor
    gate_mass: torch.Tensor
    saliency: torch.Tensor


class ExpertSession(Protocol):
    """What a framework driver offers an expert-pruning method (one loaded model)."""

    identity: MoEIdentity

    def score(self, records: Sequence[TaskRecord], maps: Mapping[int, LayerMaps] | None) -> float:
        """Mean log-likelihood per answer token of ``records`` with ``maps`` applied (``None``: original)."""

    def stats(self, records: Sequence[TaskRecord]) -> dict[int, ExpertStats]:
        """Routing statistics of the original model per MoE layer."""


class ExpertPruningMethod(Protocol):
    name: str

    def search(self, session: ExpertSession, train: Sequence[TaskRecord], dev: Sequence[TaskRecord],
               options: Any, progress: Any = None) -> Any:
        """A plan (the method's artifact) for the session's model."""

    def layer_maps(self, plan: Any, identity: MoEIdentity) -> dict[int, LayerMaps]:
        """The maps a plan applies, checked against the model at hand."""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options every expert-pruning calibration shares."""
    p.add_argument("--model", required=True, type=Path, help="transformers MoE checkpoint directory")
    p.add_argument("--task", required=True, type=Path,
                   help="task data: JSON lines {\"prompt\", \"answer\"} (scored on the answer) or plain text")
    p.add_argument("--dev-fraction", type=float, default=0.25, help="share of the records kept for the final choice")
    p.add_argument("--output", required=True, type=Path, help="plan JSON to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device the model runs on (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

"""EEP's search, framework-neutral: the one-shot baselines and the two-stage evolutionary strategy.

An individual is one pair of ``B x E`` matrices (merge C, route T) per *pattern slot*: one slot per MoE
layer, or one per contiguous group of layers (``layer_groups``), a group's pattern applied to every layer
in it. Fitness is whatever the caller measures for a full set of per-layer maps (the session's mean
log-likelihood of the task's reference answers); higher is better. Only inference is needed.

Stage 1 (pruning): C = T = a one-hot selection of B distinct experts per slot. A child re-points rows
of a slot (with probability ``row_mutation`` per slot) to experts that slot does not keep yet, or takes
whole slots from a second parent (``crossover``). The first population holds the frequency and REAP
selections and random ones.

Stage 2 (merging): starting from the best selections, children add Gaussian noise (``noise_scale``) to
entries of C and T (each with probability ``noise_prob``) and take rows from a second parent
(``crossover``); with ``freeze_route`` only C changes, so the result stays a standard checkpoint.

The best ``elite`` individuals survive each generation unchanged; parents are drawn by tournament of
two. The final choice among the last population's elite is made on the dev split. Everything random
follows one ``torch.Generator`` seeded from the options: the same seed gives the same plan.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.expert_pruning import ExpertStats, LayerMaps

from .config import EEPConfig

Fitness = Callable[[dict[int, LayerMaps]], float]


@dataclasses.dataclass
class Individual:
    merge: list[torch.Tensor]   # per slot (B, E), float64
    route: list[torch.Tensor]
    fitness: float = -math.inf

    def copy(self) -> "Individual":
        return Individual([m.clone() for m in self.merge], [r.clone() for r in self.route], self.fitness)

    def key(self) -> bytes:
        return b"".join(t.numpy().tobytes() for t in (*self.merge, *self.route))


def layer_slots(layers: Sequence[int], groups: int) -> list[list[int]]:
    """Which MoE layers share each pattern slot: one per layer (``groups`` 0), else contiguous groups."""
    layers = list(layers)
    if groups <= 0 or groups >= len(layers):
        return [[l] for l in layers]
    bounds = [round(i * len(layers) / groups) for i in range(groups + 1)]
    return [layers[bounds[i]:bounds[i + 1]] for i in range(groups)]


def selection_matrix(experts: Sequence[int], num_experts: int) -> torch.Tensor:
    m = torch.zeros(len(experts), num_experts, dtype=torch.float64)
    m[torch.arange(len(experts)), torch.as_tensor(list(experts), dtype=torch.long)] = 1.0
    return m


def top_experts(score: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` largest scores, ties broken by the lower index (deterministic)."""
    order = sorted(range(score.numel()), key=lambda e: (-float(score[e]), e))
    return sorted(order[:keep])


def baseline_selection(strategy: str, stats: Mapping[int, ExpertStats], layers: Sequence[int], num_experts: int,
                       keep: int, gen: torch.Generator) -> dict[int, list[int]]:
    """Kept experts per layer for a one-shot strategy: ``frequency`` (most-routed experts), ``reap``
    (largest router weight x expert output norm), ``random``."""
    out: dict[int, list[int]] = {}
    for layer in layers:
        if strategy == "random":
            out[layer] = sorted(int(e) for e in torch.randperm(num_experts, generator=gen)[:keep])
        elif strategy == "frequency":
            out[layer] = top_experts(stats[layer].frequency, keep)
        elif strategy == "reap":
            out[layer] = top_experts(stats[layer].saliency, keep)
        else:
            raise ConfigError(f"unknown one-shot strategy {strategy!r}")
    return out


def expand(ind: Individual, slots: Sequence[Sequence[int]], top_k: int) -> dict[int, LayerMaps]:
    return {layer: LayerMaps(ind.merge[i], ind.route[i], top_k) for i, group in enumerate(slots) for layer in group}


def _slot_selection(stats: Mapping[int, ExpertStats] | None, group: Sequence[int], attr: str, keep: int) -> list[int]:
    total = sum(getattr(stats[l], attr).double() for l in group)
    return top_experts(total, keep)


def _kept(t: torch.Tensor) -> list[int]:
    return [int(c) for c in t.argmax(dim=1)]


class _ES:
    def __init__(self, cfg: EEPConfig, fitness: Fitness, slots: list[list[int]], num_experts: int, top_k: int,
                 gen: torch.Generator, report: Callable[[str, int, float], None] | None) -> None:
        self.cfg, self.fitness, self.slots, self.E, self.k, self.gen = cfg, fitness, slots, num_experts, top_k, gen
        self.report = report
        self.cache: dict[bytes, float] = {}
        self.evaluations = 0

    def rand(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def randint(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.gen))

    def evaluate(self, pop: list[Individual]) -> None:
        for ind in pop:
            key = ind.key()
            if key not in self.cache:
                self.cache[key] = float(self.fitness(expand(ind, self.slots, self.k)))
                self.evaluations += 1
            ind.fitness = self.cache[key]
        pop.sort(key=lambda i: -i.fitness)

    def parent(self, pop: list[Individual]) -> Individual:
        a, b = pop[self.randint(len(pop))], pop[self.randint(len(pop))]
        return a if a.fitness >= b.fitness else b

    # -- stage 1 ------------------------------------------------------------------------------
    def mutate_selection(self, ind: Individual) -> Individual:
        child = ind.copy()
        for s in range(len(self.slots)):
            if self.rand() >= self.cfg.row_mutation:
                continue
            kept = _kept(child.route[s])
            free = [e for e in range(self.E) if e not in kept]
            if not free:
                continue
            row = self.randint(len(kept))
            kept[row] = free[self.randint(len(free))]
            sel = selection_matrix(sorted(kept), self.E)
            child.merge[s], child.route[s] = sel.clone(), sel
        return child

    def cross_slots(self, a: Individual, b: Individual) -> Individual:
        child = a.copy()
        for s in range(len(self.slots)):
            if self.rand() < self.cfg.crossover:
                child.merge[s], child.route[s] = b.merge[s].clone(), b.route[s].clone()
        return child

    # -- stage 2 ------------------------------------------------------------------------------
    def mutate_matrices(self, ind: Individual) -> Individual:
        child = ind.copy()
        targets = [child.merge] if self.cfg.freeze_route else [child.merge, child.route]
        for mats in targets:
            for s, m in enumerate(mats):
                mask = torch.rand(m.shape, generator=self.gen, dtype=torch.float64) < self.cfg.noise_prob
                noise = torch.randn(m.shape, generator=self.gen, dtype=torch.float64) * self.cfg.noise_scale
                mats[s] = m + noise * mask
        return child

    def cross_rows(self, a: Individual, b: Individual) -> Individual:
        child = a.copy()
        for s in range(len(self.slots)):
            for row in range(child.merge[s].shape[0]):
                if self.rand() < self.cfg.crossover:
                    child.merge[s][row] = b.merge[s][row]
                    if not self.cfg.freeze_route:
                        child.route[s][row] = b.route[s][row]
        return child

    def generation(self, pop: list[Individual], stage: int) -> list[Individual]:
        nxt = [p.copy() for p in pop[: self.cfg.elite]]
        seen = {p.key() for p in nxt}
        tries = 0
        while len(nxt) < self.cfg.population and tries < 20 * self.cfg.population:
            tries += 1
            a, b = self.parent(pop), self.parent(pop)
            if stage == 1:
                child = self.mutate_selection(self.cross_slots(a, b))
            else:
                child = self.mutate_matrices(self.cross_rows(a, b))
            if child.key() not in seen:
                seen.add(child.key())
                nxt.append(child)
        self.evaluate(nxt)
        return nxt

    def run_stage(self, pop: list[Individual], stage: int, generations: int) -> list[Individual]:
        for g in range(generations):
            pop = self.generation(pop, stage)
            if self.report:
                self.report(f"stage {stage}", g + 1, pop[0].fitness)
        return pop


@dataclasses.dataclass
class SearchResult:
    maps: dict[int, LayerMaps]
    train_fitness: float
    dev_fitness: float | None
    evaluations: int
    seconds: float
    history: list[tuple[str, int, float]]


def search(cfg: EEPConfig, layers: Sequence[int], num_experts: int, model_top_k: int,
           stats: Mapping[int, ExpertStats] | None, train_fitness: Fitness, dev_fitness: Fitness | None = None,
           report: Callable[[str, int, float], None] | None = None) -> SearchResult:
    """Maps for every MoE layer by ``cfg.strategy`` (one-shot baselines need ``stats``; ``random`` does not)."""
    t0 = time.perf_counter()
    keep = cfg.experts
    if keep > num_experts:
        raise ConfigError(f"experts={keep} is more than the model's {num_experts} experts per layer")
    top_k = cfg.active or min(model_top_k, keep)
    if top_k > keep:
        raise ConfigError(f"active={top_k} experts per token is more than the {keep} kept")
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[tuple[str, int, float]] = []

    def note(stage: str, g: int, best: float) -> None:
        history.append((stage, g, best))
        if report:
            report(stage, g, best)

    if cfg.strategy != "eep":
        if cfg.strategy != "random" and stats is None:
            raise ConfigError(f"strategy {cfg.strategy!r} needs routing statistics")
        chosen = baseline_selection(cfg.strategy, stats or {}, layers, num_experts, keep, gen)
        maps = {l: LayerMaps(selection_matrix(e, num_experts), selection_matrix(e, num_experts), top_k)
                for l, e in chosen.items()}
        fit = float(train_fitness(maps))
        dev = float(dev_fitness(maps)) if dev_fitness else None
        return SearchResult(maps, fit, dev, 1, time.perf_counter() - t0, history)

    slots = layer_slots(layers, cfg.layer_groups)
    es = _ES(cfg, train_fitness, slots, num_experts, top_k, gen, note)
    pop: list[Individual] = []
    for attr in (("frequency", "saliency", "gate_mass") if stats is not None else ()):
        sels = [selection_matrix(_slot_selection(stats, g, attr, keep), num_experts) for g in slots]
        pop.append(Individual([s.clone() for s in sels], sels))
    while len(pop) < cfg.population:
        sels = [selection_matrix(sorted(int(e) for e in torch.randperm(num_experts, generator=gen)[:keep]),
                                 num_experts) for _ in slots]
        pop.append(Individual([s.clone() for s in sels], sels))
    es.evaluate(pop)
    note("init", 0, pop[0].fitness)
    pop = es.run_stage(pop, 1, cfg.prune_generations)
    pop = es.run_stage(pop, 2, cfg.merge_generations)
    finalists = pop[: cfg.elite]
    if dev_fitness is not None:
        devs = [float(dev_fitness(expand(f, slots, top_k))) for f in finalists]
        best = max(range(len(finalists)), key=lambda i: (devs[i], -i))
        dev = devs[best]
    else:
        best, dev = 0, None
    win = finalists[best]
    return SearchResult(expand(win, slots, top_k), win.fitness, dev, es.evaluations, time.perf_counter() - t0, history)

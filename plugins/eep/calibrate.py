"""EEP's calibration: routing statistics, then the search (:mod:`overdrive.eep.search`), on a session."""
from __future__ import annotations

from typing import Callable, Sequence

from overdrive.contracts.expert_pruning import ExpertSession, TaskRecord

from .config import EEPConfig, EEPPlan
from .search import search


def calibrate(session: ExpertSession, train: Sequence[TaskRecord], dev: Sequence[TaskRecord], options: EEPConfig,
              progress: Callable[[str], None] | None = None) -> EEPPlan:
    """An EEP plan for the session's model: the strategy's maps, with train/dev fitness recorded (mean
    log-likelihood per answer token) next to the unpruned model's."""
    ident = session.identity
    if options.experts > ident.num_experts:
        from overdrive.config import ConfigError

        raise ConfigError(f"--experts {options.experts}: the model has only {ident.num_experts} experts per layer")
    stats = session.stats(train) if options.strategy != "random" else None
    base_train = session.score(train, None)
    base_dev = session.score(dev, None) if dev else None

    def report(stage: str, gen: int, best: float) -> None:
        if progress:
            progress(f"eep {stage} generation {gen}: best train log-likelihood {best:.4f} (unpruned {base_train:.4f})")

    result = search(options, ident.moe_layers, ident.num_experts, ident.top_k, stats,
                    lambda maps: session.score(train, maps), (lambda maps: session.score(dev, maps)) if dev else None,
                    report)
    fitness = {"train": result.train_fitness, "unpruned_train": base_train, "evaluations": float(result.evaluations)}
    if result.dev_fitness is not None:
        fitness.update(dev=result.dev_fitness, unpruned_dev=base_dev)
    return EEPPlan(ident, result.maps, options, fitness, round(result.seconds, 3))

"""The EEP method object (``METHOD``), the kind contract's implementation."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

from overdrive.contracts.expert_pruning import ExpertSession, LayerMaps, MoEIdentity, TaskRecord

from .config import EEPConfig, EEPPlan


class EEPMethod:
    name = "eep"

    def search(self, session: ExpertSession, train: Sequence[TaskRecord], dev: Sequence[TaskRecord],
               options: EEPConfig, progress: Callable[[str], None] | None = None) -> EEPPlan:
        from .calibrate import calibrate

        return calibrate(session, train, dev, options, progress)

    def load_plan(self, path: str | Path) -> EEPPlan:
        return EEPPlan.load(path)

    def layer_maps(self, plan: EEPPlan, identity: MoEIdentity) -> dict[int, LayerMaps]:
        plan.identity.check(identity, "EEP plan")
        return dict(plan.layers)

    def options_from_args(self, args: argparse.Namespace) -> EEPConfig:
        from .cli import options_from_args

        return options_from_args(args)

    def summary(self, plan: EEPPlan) -> str:
        f = plan.fitness
        dev = f" dev {f['dev']:.4f} (unpruned {f['unpruned_dev']:.4f})" if "dev" in f else ""
        return (f"{plan.options.strategy}: {plan.num_kept} of {plan.identity.num_experts} experts kept, "
                f"{plan.top_k} active; train log-likelihood {f['train']:.4f} (unpruned {f['unpruned_train']:.4f}){dev}; "
                f"{'exports as a standard checkpoint' if plan.discrete else 'needs the overdrive runtime'}; "
                f"{plan.search_seconds:.1f} s")


METHOD: Any = EEPMethod()

"""argparse glue of EEP's verbs: ``overdrive calibrate --method eep`` and ``overdrive export --method eep``."""
from __future__ import annotations

import argparse
from pathlib import Path

from overdrive.contracts.expert_pruning import add_model_arguments

from .config import STRATEGIES, EEPConfig


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    d = EEPConfig(experts=1)
    p.add_argument("--experts", type=int, required=True, help="B: experts kept per MoE layer")
    p.add_argument("--active", type=int, default=0, help="k: experts active per token (default: the model's, capped at B)")
    p.add_argument("--strategy", choices=STRATEGIES, default="eep",
                   help="eep (evolutionary search) or a one-shot baseline: frequency, reap (router weight x expert "
                        "output norm), random")
    p.add_argument("--layer-groups", type=int, default=0, help="0: one pattern per layer; G: G groups of layers")
    p.add_argument("--population", type=int, default=d.population)
    p.add_argument("--prune-generations", type=int, default=d.prune_generations)
    p.add_argument("--merge-generations", type=int, default=d.merge_generations)
    p.add_argument("--freeze-route", action="store_true",
                   help="stage 2 merges experts only; the plan still exports as a standard checkpoint")
    p.add_argument("--seed", type=int, default=0)


def options_from_args(args: argparse.Namespace) -> EEPConfig:
    return EEPConfig(experts=args.experts, active=args.active, strategy=args.strategy, layer_groups=args.layer_groups,
                     population=args.population, prune_generations=args.prune_generations,
                     merge_generations=args.merge_generations, freeze_route=args.freeze_route, seed=args.seed)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="the original transformers MoE checkpoint directory")
    p.add_argument("--plan", required=True, type=Path, help="EEP plan JSON (overdrive calibrate --method eep)")
    p.add_argument("--output", required=True, type=Path, help="checkpoint directory to write (must not exist)")
    p.add_argument("--allow-inexact", action="store_true",
                   help="write a checkpoint even when it only approximates the plan (continuous routes, or a model "
                        "that does not renormalise its top-k weights)")


def run_export(args: argparse.Namespace) -> int:
    from .config import EEPPlan
    from .export import export_checkpoint

    plan = EEPPlan.load(args.plan)
    out = export_checkpoint(args.model, plan, args.output, allow_inexact=args.allow_inexact)
    print(f"wrote {out}: {plan.num_kept} of {plan.identity.num_experts} experts per layer, {plan.top_k} active "
          f"({'exact' if plan.discrete else 'approximate'}); serve it with any engine, no plugin needed")
    return 0

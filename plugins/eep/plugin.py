"""Entry-point object of the built-in EEP method (cheap: imports no engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import EEPConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="eep", kind=Kind.EXPERT_PRUNING, config_cls=EEPConfig,
        paper="Efficient Expert Pruning for Sparse Mixture-of-Experts Language Models (EEP, arXiv 2407.00945, "
              "imagination-research/EEP)",
        impl="overdrive.eep.method:METHOD",
        summary="gradient-free evolutionary search of expert pruning and merging maps per MoE layer; discrete plans "
                "export as standard checkpoints with fewer experts",
        commands={
            "calibrate": MethodCommand(
                help="search EEP maps (or a frequency / REAP / random baseline) on task data; writes a plan JSON",
                add_arguments="overdrive.eep.cli:add_calibrate_arguments",
                run="overdrive.transformers:expert_pruning_command"),
            "export": MethodCommand(
                help="write a discrete EEP plan as a standard checkpoint with fewer experts (stock engines serve it)",
                add_arguments="overdrive.eep.cli:add_export_arguments", run="overdrive.eep.cli:run_export")},
    )]

"""Entry-point object of the built-in R2R method (cheap: imports no engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import R2RRouterConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="r2r", kind=Kind.ROUTING, config_cls=R2RRouterConfig,
        paper="R2R: Efficiently Navigating Divergent Reasoning Paths with Small-Large Model Token Routing "
              "(Roads to Rome, NeurIPS 2025, thu-nics/R2R)",
        impl="overdrive.r2r.method:METHOD",
        summary="a small model writes; a router on its hidden state, top-k logits and token sends "
                "meaning-changing tokens to a large model",
        commands={"calibrate": MethodCommand(
            help="label small/large mismatches (teacher-forced small prefill over large answers, continuations, "
                 "a judge) and train the R2R router; writes a router folder",
            add_arguments="overdrive.r2r.cli:add_arguments", run="overdrive.r2r.cli:run")},
    )]

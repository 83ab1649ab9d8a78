"""Entry-point object of the built-in MoA method (cheap: imports no kernels or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import MoAPlan


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="moa", kind=Kind.KV_CACHE, config_cls=MoAPlan,
        paper="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (thu-nics/MoA)",
        impl="overdrive.moa.method:METHOD",
        summary="per-KV-head elastic sparse attention spans (sink + recent window, span = alpha + beta * N)",
        commands={"calibrate": MethodCommand(
            help="calibrate a MoA plan (per-head spans from attention influence, scipy milp under a density budget)",
            add_arguments="overdrive.moa.cli:add_arguments", run="overdrive.moa.cli:run")},
    )]

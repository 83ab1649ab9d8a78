"""Entry-point object of the built-in DiTFastAttn method (cheap: imports no kernels or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import DiTFastAttnConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="ditfastattn", kind=Kind.DIT_CACHE, config_cls=DiTFastAttnConfig,
        paper="DiTFastAttn (NeurIPS 2024, thu-nics/DiTFastAttn) and DiTFastAttnV2 (arXiv 2503.22796)",
        impl="overdrive.ditfastattn.method:METHOD",
        summary="window/arrow attention, timestep and CFG attention sharing for DiTs, per block (v1) or head (v2)",
        commands={"calibrate": MethodCommand(
            help="calibrate a DiTFastAttn plan (v1 greedy or v2 integer program) on a diffusers pipeline",
            add_arguments="overdrive.ditfastattn.cli:add_arguments",
            run="overdrive.diffusers:calibrate_command")},
    )]

"""Entry-point object of the built-in MxMoE method (cheap: imports no kernels or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import MxMoEConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="mxmoe", kind=Kind.WEIGHT_QUANT, config_cls=MxMoEConfig,
        paper="MxMoE: Mixed-precision Quantization for MoE with Accuracy and Performance Co-Design "
              "(arXiv 2505.05799, cat538/MxMoE)",
        impl="overdrive.mxmoe.method:METHOD",
        summary="per-(layer, expert, linear) mixed-precision MoE expert quantization from sensitivity, expert "
                "frequency and a measured kernel cost table (integer program per layer)",
        commands={"quantize": MethodCommand(
            help="calibrate and write an MxMoE checkpoint (per-expert formats under an average-bits budget)",
            add_arguments="overdrive.mxmoe.cli:add_arguments", run="overdrive.mxmoe.cli:run"),
            "export": MethodCommand(
                help="write the best per-layer-uniform approximation of an MxMoE plan as compressed-tensors "
                     "(stock engines; one scheme per MoE layer)",
                add_arguments="overdrive.mxmoe.export:add_arguments", run="overdrive.mxmoe.export:run")},
    )]

"""Entry-point object of the built-in MBQ method (cheap: imports no kernels or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import MBQConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="mbq", kind=Kind.WEIGHT_QUANT, config_cls=MBQConfig,
        paper="MBQ: Modality-Balanced Quantization for Large Vision-Language Models (thu-nics/MBQ)",
        impl="overdrive.mbq.method:METHOD",
        summary="modality-balanced W3/W4/W4A8/W8A8 quantization of the language decoder",
        commands={"quantize": MethodCommand(
            help="quantize a (vision-)language model into an MBQ checkpoint",
            add_arguments="overdrive.mbq.cli:add_arguments", run="overdrive.mbq.cli:run"),
            "export": MethodCommand(
                help="convert an MBQ checkpoint to the compressed-tensors layout (engines' own kernels)",
                add_arguments="overdrive.mbq.export:add_arguments", run="overdrive.mbq.export:run")},
    )]

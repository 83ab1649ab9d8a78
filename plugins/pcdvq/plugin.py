"""Entry-point object of the built-in PCDVQ method (cheap: imports no kernels or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import PCDVQConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="pcdvq", kind=Kind.WEIGHT_QUANT, config_cls=PCDVQConfig,
        paper="PCDVQ: Enhancing Vector Quantization for Large Language Models via Polar Coordinate Decoupling",
        impl="overdrive.pcdvq.method:METHOD",
        summary="2-2.25-bit vector quantization: E8 directions and chi(8) Lloyd-Max magnitudes after a random Hadamard",
        commands={"quantize": MethodCommand(
            help="quantize a language model into a PCDVQ checkpoint (round to nearest codeword, no calibration)",
            add_arguments="overdrive.pcdvq.cli:add_arguments", run="overdrive.pcdvq.cli:run")},
    )]

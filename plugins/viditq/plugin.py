"""Entry-point object of the built-in ViDiT-Q method (cheap: imports no kernels or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import ViDiTQConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="viditq", kind=Kind.DIT_CACHE, config_cls=ViDiTQConfig,
        paper="ViDiT-Q: Efficient and Accurate Quantization of Diffusion Transformers for Image and Video "
              "Generation (ICLR 2025, thu-nics/ViDiT-Q)",
        impl="overdrive.viditq.method:METHOD",
        summary="timestep-aware W8A8 / W4A8 DiT quantization: int8 GEMM with fused per-token activations, "
                "per-range channel balancing and mixed precision, int8/int4 storage",
        commands={"calibrate": MethodCommand(
            help="calibrate ViDiT-Q on a diffusers pipeline and write a quantized pipeline directory",
            add_arguments="overdrive.viditq.cli:add_arguments",
            run="overdrive.diffusers:calibrate_command")},
    )]

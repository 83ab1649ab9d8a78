"""Entry-point object of the built-in VGDFR method (cheap: imports no torch code paths or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import VGDFRConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="vgdfr", kind=Kind.FRAME_RATE, config_cls=VGDFRConfig,
        paper="VGDFR: Diffusion-based Video Generation with Dynamic Latent Frame Rate (arXiv 2504.12259, "
              "thu-nics/VGDFR); DLFR-VAE (arXiv 2502.11897) for the variable-frame-rate encode/decode",
        impl="overdrive.vgdfr.method:METHOD",
        summary="merge alike latent frames after a few denoising steps, finish on the shorter latent, "
                "interpolate the merged frames back (training-free)",
        commands={"generate": MethodCommand(
            help="generate a video with VGDFR on a diffusers pipeline; writes the frames and the schedule",
            add_arguments="overdrive.vgdfr.cli:add_arguments",
            run="overdrive.diffusers:generate_command")},
    )]

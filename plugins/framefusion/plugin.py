"""Entry-point object of the built-in FrameFusion method (cheap: imports no engines)."""
from __future__ import annotations

from overdrive import Kind, MethodSpec, hookimpl

from .config import FrameFusionConfig


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="framefusion", kind=Kind.TOKEN_REDUCTION, config_cls=FrameFusionConfig,
        paper="FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large "
              "Vision Language Models (ICCV 2025, thu-nics/FrameFusion)",
        impl="overdrive.framefusion.method:METHOD",
        summary="merge video tokens repeated across adjacent frames, then prune by attention, to a compute budget",
    )]

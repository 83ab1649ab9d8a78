"""Entry-point object of the built-in PM-KVQ method (cheap: imports no kernels or engines)."""
from __future__ import annotations

from overdrive import Kind, MethodCommand, MethodSpec, hookimpl

from .config import PMKVQPlan


@hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [MethodSpec(
        name="pmkvq", kind=Kind.KV_CACHE, config_cls=PMKVQPlan,
        paper="PM-KVQ: Progressive Mixed-precision KV Cache Quantization for Long-CoT LLMs (thu-nics/PM-KVQ)",
        impl="overdrive.pmkvq.method:METHOD",
        summary="per-layer mixed-precision KV cache (16/8/4/2-bit codes) with a full-precision sink and window",
        commands={"calibrate": MethodCommand(
            help="calibrate a PM-KVQ plan (per-layer KV bit widths under a memory budget, key scales)",
            add_arguments="overdrive.pmkvq.cli:add_arguments", run="overdrive.pmkvq.cli:run")},
    )]

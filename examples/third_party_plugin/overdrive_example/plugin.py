"""The plugin object: one pluggy hook returning method descriptors. Imports nothing heavy."""
from __future__ import annotations

import overdrive
from overdrive import Kind, MethodCommand, MethodSpec

from .configs import Int8KVConfig, StepCacheConfig, W8Config


@overdrive.hookimpl
def overdrive_methods() -> list[MethodSpec]:
    return [
        MethodSpec(
            name="example_w8", kind=Kind.WEIGHT_QUANT, config_cls=W8Config,
            paper="round-to-nearest baseline (no paper); example plugin",
            impl="overdrive_example.w8:METHOD",
            summary="int8 weight-only RTN, symmetric per output channel",
            commands={"quantize": MethodCommand(
                help="quantize a transformers checkpoint's linear layers to int8 (RTN)",
                add_arguments="overdrive_example.w8:add_quantize_arguments",
                run="overdrive_example.w8:run_quantize")},
        ),
        MethodSpec(
            name="example_stepcache", kind=Kind.DIT_CACHE, config_cls=StepCacheConfig,
            paper="step-reuse baseline (no paper); example plugin",
            impl="overdrive_example.stepcache:METHOD",
            summary="reuse the denoiser output between recomputations every `interval` steps",
        ),
        MethodSpec(
            name="example_int8kv", kind=Kind.KV_CACHE, config_cls=Int8KVConfig,
            paper="per-token int8 KV baseline (no paper); example plugin",
            impl="overdrive_example.int8kv:METHOD",
            summary="per-token symmetric int8 K/V cache with a few full-precision sink tokens",
        ),
    ]

"""SGLang adapter: ``sglang.srt.plugins`` entry point ``overdrive = overdrive.adapters.sglang:register``.

Weight-quantization methods go into SGLang's ``QUANTIZATION_METHODS`` dict and its ``--quantization``
CLI choices (SGLang 0.5.23 has no register function for quantization: a SOFT surface, see
docs/ledger.md). KV-cache methods go into its attention-backend registry and choices
(:mod:`overdrive.adapters.sglang.kv_cache`). The linear method is the same generic class as vLLM's, built on SGLang's bases.
"""
from __future__ import annotations

from typing import Any

from overdrive.adapters._register import register_generated, resolve_generated, run_once

#: generated engine config classes by class name (see __getattr__)
_classes: dict[str, type] = {}


def register() -> None:
    """Entry point run by SGLang's ``load_plugins()`` in every process. Idempotent."""
    run_once("sglang", "sglang", _register)


def _register() -> tuple[list[str], list[str]]:
    import overdrive
    from overdrive.adapters._weight_quant import build_config_class
    from overdrive.kinds import Kind

    def is_intree(name: str) -> bool:
        from sglang.srt.layers import quantization as q

        return name in q.QUANTIZATION_METHODS and getattr(q.QUANTIZATION_METHODS[name], "overdrive_method", None) != name

    def install(name: str, cls: type) -> None:
        from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES, add_quantization_method_choices
        from sglang.srt.layers import quantization as q

        q.QUANTIZATION_METHODS[name] = cls
        if name not in QUANTIZATION_CHOICES:
            add_quantization_method_choices([name])

    specs = overdrive.list_methods(Kind.WEIGHT_QUANT)
    api = _quant_api() if specs else None
    registered, skipped = register_generated("sglang", specs, lambda spec: {"Config": build_config_class(spec, api)},
                                             install, is_intree=is_intree, module=__name__, classes=_classes)
    from overdrive.adapters.sglang.kv_cache import register_backends

    kv, kv_skipped = register_backends()  # KV-cache methods: --attention-backend NAME
    return registered + kv, skipped + kv_skipped


def _quant_api():
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from sglang.srt.utils import set_weight_attrs

    from overdrive.adapters._weight_quant import EngineQuantAPI

    def get_scaled_act_names(self: Any) -> list[str]:
        return []

    return EngineQuantAPI("SGLang", __name__, QuantizationConfig, LinearMethodBase, LinearBase,
                          UnquantizedLinearMethod, set_weight_attrs,
                          extra_methods={"get_scaled_act_names": get_scaled_act_names})


def __getattr__(name: str) -> Any:
    return resolve_generated(__name__, name, _classes, register)

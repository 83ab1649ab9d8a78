"""SGLang adapter: ``sglang.srt.plugins`` entry point ``overdrive = overdrive.adapters.sglang:register``.

Weight-quantization methods go into SGLang's ``QUANTIZATION_METHODS`` dict and its ``--quantization``
CLI choices (SGLang 0.5.23 has no register function for quantization: a SOFT surface, see
docs/ledger.md). The linear method is the same generic class as vLLM's, built on SGLang's bases.
"""
from __future__ import annotations

from typing import Any

from ._register import keep_intree, run_once

#: generated engine config classes by class name (see __getattr__)
_classes: dict[str, type] = {}


def register() -> None:
    """Entry point run by SGLang's ``load_plugins()`` in every process. Idempotent."""
    run_once("sglang", "sglang", _register)


def _register() -> tuple[list[str], list[str]]:
    import overdrive
    from overdrive.kinds import Kind

    registered: list[str] = []
    skipped: list[str] = []
    specs = overdrive.list_methods(Kind.WEIGHT_QUANT)
    if specs:
        from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES, add_quantization_method_choices
        from sglang.srt.layers import quantization as q

        from ._weight_quant import build_config_class

        api = _quant_api()
        for spec in specs:
            ours = getattr(q.QUANTIZATION_METHODS.get(spec.name), "overdrive_method", None) == spec.name
            reason = keep_intree("sglang", spec.name, spec.name in q.QUANTIZATION_METHODS and not ours)
            if reason:
                skipped.append(reason)
                continue
            cls = build_config_class(spec, api)
            _classes[cls.__name__] = cls
            q.QUANTIZATION_METHODS[spec.name] = cls
            if spec.name not in QUANTIZATION_CHOICES:
                add_quantization_method_choices([spec.name])
            registered.append(spec.name)
    return registered, skipped


def _quant_api():
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from sglang.srt.utils import set_weight_attrs

    from ._weight_quant import EngineQuantAPI

    def get_scaled_act_names(self: Any) -> list[str]:
        return []

    return EngineQuantAPI("SGLang", __name__, QuantizationConfig, LinearMethodBase, LinearBase,
                          UnquantizedLinearMethod, set_weight_attrs,
                          extra_methods={"get_scaled_act_names": get_scaled_act_names})


def __getattr__(name: str) -> Any:
    # Generated config classes are pickled by reference (module + class name) when the engine sends
    # its config to worker processes; resolving them here registers first if this process has not.
    if name.startswith("Overdrive") and name.endswith("Config"):
        register()
        if name in _classes:
            return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

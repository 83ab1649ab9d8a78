"""vLLM adapter: ``vllm.general_plugins`` entry point ``overdrive = overdrive.adapters.vllm:register``.

Registers every weight-quantization method as a vLLM quantization config
(``register_quantization_config``), so ``vllm serve CKPT`` detects it from config.json and
``--quantization NAME`` selects it. Symbols touched are listed in docs/ledger.md.
"""
from __future__ import annotations

from typing import Any

from ._register import keep_intree, run_once

#: generated engine config classes by class name (see __getattr__)
_classes: dict[str, type] = {}


def register() -> None:
    """Entry point run by vLLM in every process. Idempotent; a no-op without vLLM."""
    run_once("vllm", "vllm", _register)


def _register() -> tuple[list[str], list[str]]:
    import overdrive
    from overdrive.kinds import Kind

    registered: list[str] = []
    skipped: list[str] = []
    specs = overdrive.list_methods(Kind.WEIGHT_QUANT)
    if specs:
        from vllm.model_executor.layers import quantization as q

        api = _quant_api()
        from ._weight_quant import build_config_class

        for spec in specs:
            reason = keep_intree("vllm", spec.name, spec.name in q.QUANTIZATION_METHODS
                                 and spec.name not in q._CUSTOMIZED_METHOD_TO_QUANT_CONFIG)
            if reason:
                skipped.append(reason)
                continue
            cls = build_config_class(spec, api)
            _classes[cls.__name__] = cls
            q.register_quantization_config(spec.name)(cls)
            registered.append(spec.name)
    return registered, skipped


def _quant_api():
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.utils import set_weight_attrs

    from ._weight_quant import EngineQuantAPI

    return EngineQuantAPI("vLLM", __name__, QuantizationConfig, LinearMethodBase, LinearBase,
                          UnquantizedLinearMethod, set_weight_attrs)


def __getattr__(name: str) -> Any:
    # Generated config classes are pickled by reference (module + class name) when the engine sends
    # its config to worker processes; resolving them here registers first if this process has not.
    if name.startswith("Overdrive") and name.endswith("Config"):
        register()
        if name in _classes:
            return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

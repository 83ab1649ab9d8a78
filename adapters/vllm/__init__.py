"""vLLM adapter: ``vllm.general_plugins`` entry point ``overdrive = overdrive.adapters.vllm:register``.

Registers every weight-quantization method as a vLLM quantization config
(``register_quantization_config``), so ``vllm serve CKPT`` detects it from config.json and
``--quantization NAME`` selects it; token-reduction methods are enabled per server with
``--additional-config '{"NAME": {...}}'`` (:mod:`overdrive.adapters.vllm.token_reduction`);
vocabulary-selection methods likewise (:mod:`overdrive.adapters.vllm.vocab`);
KV-cache methods are attention backends (``--attention-backend NAME``; on CPU an override of
``CPU_ATTN``), their plan given with ``--additional-config`` (:mod:`overdrive.adapters.vllm.kv_cache`).
Symbols touched are listed in docs/ledger.md.
"""
from __future__ import annotations

from typing import Any

from overdrive.adapters._register import register_generated, resolve_generated, run_once

#: generated engine config classes by class name (see __getattr__)
_classes: dict[str, type] = {}


def register() -> None:
    """Entry point run by vLLM in every process. Idempotent; a no-op without vLLM."""
    run_once("vllm", "vllm", _register)


def _register() -> tuple[list[str], list[str]]:
    import overdrive
    from overdrive.adapters._weight_quant import build_config_class
    from overdrive.kinds import Kind

    def is_intree(name: str) -> bool:
        from vllm.model_executor.layers import quantization as q

        return name in q.QUANTIZATION_METHODS and name not in q._CUSTOMIZED_METHOD_TO_QUANT_CONFIG

    def install(name: str, cls: type) -> None:
        from vllm.model_executor.layers.quantization import register_quantization_config

        register_quantization_config(name)(cls)

    specs = overdrive.list_methods(Kind.WEIGHT_QUANT)
    api = _quant_api() if specs else None
    registered, skipped = register_generated("vllm", specs, lambda spec: {"Config": build_config_class(spec, api)},
                                             install, is_intree=is_intree, module=__name__, classes=_classes)
    from overdrive.adapters.vllm.token_reduction import register as register_token_reduction

    more, more_skipped = register_token_reduction()  # token reduction: --additional-config '{"NAME": {...}}'
    from overdrive.adapters.vllm.kv_cache import register_backends

    kv, kv_skipped = register_backends()  # KV-cache methods: --attention-backend NAME (+ CPU_ATTN override on CPU)
    from overdrive.adapters.vllm.vocab import register as register_vocab

    vocab, vocab_skipped = register_vocab()  # vocabulary methods: --additional-config '{"NAME": {"profile": ...}}'
    return registered + more + kv + vocab, skipped + more_skipped + kv_skipped + vocab_skipped


def _quant_api():
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.utils import set_weight_attrs

    from overdrive.adapters._weight_quant import EngineQuantAPI
    from overdrive.adapters.vllm.linear_kernels import kernel_handoff
    from overdrive.adapters.vllm.moe_quant import moe_method

    return EngineQuantAPI("vLLM", __name__, QuantizationConfig, LinearMethodBase, LinearBase,
                          UnquantizedLinearMethod, set_weight_attrs, kernel_handoff=kernel_handoff,
                          moe_method=moe_method)


def __getattr__(name: str) -> Any:
    # Generated config classes are pickled by reference when vLLM sends its config to worker
    # processes; resolving them here registers first if this process has not yet.
    return resolve_generated(__name__, name, _classes, register)

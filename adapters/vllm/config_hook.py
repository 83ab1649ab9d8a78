"""One chained configuration hook per kind in vLLM's ``MODELS_CONFIG_MAP``.

vLLM calls ``MODELS_CONFIG_MAP[architecture].verify_and_update_config(vllm_config)`` while it builds the
``VllmConfig`` (at startup in the API server / ``vllm.LLM``): the only per-model callback that sees the
whole config, ``additional_config`` included. A kind adapter that must check or complete the config at
startup (token reduction, vocabulary selection) installs its ``configure`` here: for every architecture
vLLM knows, the current entry (vLLM's own or another plugin's hook) is subclassed and chained, so each
hook runs the one before it first. ``flag`` marks the hook class; an entry that already carries it (or
a subclass of it: a later kind's hook chained on top) is left alone, so installing twice changes
nothing. Symbols touched: docs/ledger.md.
"""
from __future__ import annotations

from typing import Any, Callable

_hooks: dict[tuple[str, Any], type] = {}  # (flag, previous entry or None) -> chained hook class


def install_config_hook(flag: str, label: str, configure: Callable[[Any], None]) -> None:
    """Chain ``configure(vllm_config)`` after every architecture's entry (idempotent, cheap; no CUDA)."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch in ModelRegistry.get_supported_archs():
        prev = MODELS_CONFIG_MAP.get(arch)
        if getattr(prev, flag, False):
            continue
        MODELS_CONFIG_MAP[arch] = _hook_for(prev, flag, label, configure)


def _hook_for(prev: type | None, flag: str, label: str, configure: Callable[[Any], None]) -> type:
    if (flag, prev) in _hooks:
        return _hooks[flag, prev]
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class ConfigHook(prev or VerifyAndUpdateConfig):  # type: ignore[misc]
        @classmethod
        def verify_and_update_config(cls, vllm_config: Any) -> None:
            if prev is not None:
                prev.verify_and_update_config(vllm_config)
            configure(vllm_config)

    setattr(ConfigHook, flag, True)
    ConfigHook.__name__ = label
    ConfigHook.__qualname__ = f"{label}[{getattr(prev, '__name__', 'none')}]"
    _hooks[flag, prev] = ConfigHook
    return ConfigHook

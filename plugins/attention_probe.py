"""Run a transformers model with a method's own attention function for a while (calibration probes).

PM-KVQ and MoA calibrate by recording (or replacing) what each attention layer sees. Both register a
function with transformers' ``AttentionInterface`` (masks built as for SDPA), switch the model to it,
hand it per-run state through a ``ContextVar`` and switch back afterwards; :func:`attention_function`
is that one pattern.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def attention_function(model: torch.nn.Module, name: str, fn: Callable[..., Any],
                       state: contextvars.ContextVar[T | None], value: T) -> Iterator[T]:
    """Run ``model`` with ``fn`` registered as attention implementation ``name`` and ``state`` set to
    ``value``; the model's previous implementation and ``state`` are restored on exit (also on errors)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation(name)
    token = state.set(value)
    try:
        yield value
    finally:
        state.reset(token)
        model.set_attn_implementation(prev)

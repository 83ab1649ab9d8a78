"""What ``overdrive.transformers.enable`` attached to each model instance: one registry, keyed by kind.

A model holds at most one attachment per kind (a token-reduction and a vocabulary method may sit on the
same model); an attachment is any object with ``name`` and ``detach()``. Entries are weak: a model that
is garbage-collected leaves nothing behind.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from overdrive.kinds import Kind

_attached: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Kind, Any]]" = weakref.WeakKeyDictionary()


def claim(model: torch.nn.Module, kind: Kind) -> None:
    """Refuse a second method of ``kind`` on ``model`` (before anything is attached)."""
    att = get(model, kind)
    if att is not None:
        raise RuntimeError(f"{att.name!r} is already enabled on this model; call "
                           "overdrive.transformers.disable(model) first")


def put(model: torch.nn.Module, kind: Kind, att: Any) -> Any:
    claim(model, kind)
    _attached.setdefault(model, {})[kind] = att
    return att


def get(model: torch.nn.Module, kind: Kind) -> Any:
    """The attachment of ``kind`` on ``model``, or None."""
    return _attached.get(model, {}).get(kind)


def detach(model: torch.nn.Module, kind: Kind) -> bool:
    """Detach and forget the attachment of ``kind`` on ``model``; False if there was none."""
    held = _attached.get(model, {})
    att = held.pop(kind, None)
    if not held:
        _attached.pop(model, None)
    if att is None:
        return False
    att.detach()
    return True

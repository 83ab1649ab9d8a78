"""Engine-neutral pieces shared by the KV-cache adapters (vLLM, SGLang, transformers).

Finding the KV-cache methods in the registry, the environment variable that names a method's plan, and
loading a plan into per-layer formats with errors that say where the plan came from. Imports no engine.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import KVCacheMethod, LayerKVFormat, ModelIdentity
from overdrive.kinds import Kind


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (one object per loaded plan)
class Active:
    """A KV-cache method with its loaded plan, and where the plan came from (for messages)."""

    name: str
    method: KVCacheMethod
    cfg: Any
    source: str


def kv_methods() -> list[Any]:
    """Registered methods of the KV-cache kind (``MethodSpec`` objects)."""
    import overdrive

    return overdrive.list_methods(Kind.KV_CACHE)


def plan_env(name: str) -> str:
    """Environment variable naming a method's plan file: ``OVERDRIVE_<NAME>_PLAN``."""
    return f"OVERDRIVE_{name.upper()}_PLAN"


def example_name() -> str:
    """A registered KV-cache method's name for usage messages (``NAME`` when none is registered)."""
    names = [spec.name for spec in kv_methods()]
    return names[0] if names else "NAME"


@functools.lru_cache(maxsize=8)
def load_active(name: str, path: str, source: str) -> Active:
    """Method ``name`` with the plan at ``path``; ConfigError prefixed by ``source`` (the flag or variable)."""
    import overdrive

    method = overdrive.get_method(name, Kind.KV_CACHE).load_impl()
    if not isinstance(method, KVCacheMethod):
        raise ConfigError(f"{source}: method {name!r} does not implement overdrive.contracts.KVCacheMethod "
                          f"(got {type(method).__name__})")
    try:
        cfg = method.load_config(path)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return Active(name, method, cfg, f"{source}={path}")


@functools.lru_cache(maxsize=8)
def paged_formats(active: Active, ident: ModelIdentity, tp_rank: int = 0, tp_size: int = 1
                  ) -> tuple[LayerKVFormat, ...]:
    """The method's per-layer formats for one tensor-parallel rank, checked against the model's layer count."""
    try:
        fmts = tuple(active.method.layer_formats(active.cfg, ident, tp_rank=tp_rank, tp_size=tp_size))
    except ConfigError as e:
        raise ConfigError(f"{active.source}: {e}") from None
    check_formats(fmts, ident, active.source)
    return fmts


def check_formats(fmts: tuple[LayerKVFormat, ...] | list[LayerKVFormat], ident: ModelIdentity, source: str) -> None:
    """Formats cover layers 0..L-1 in order with the model's head size (ConfigError naming the layer)."""
    if [f.layer for f in fmts] != list(range(ident.num_layers)):
        raise ConfigError(f"{source}: the method gave formats for layers {[f.layer for f in fmts]}, expected "
                          f"0..{ident.num_layers - 1}")
    for f in fmts:
        if f.head_size != ident.head_size:
            raise ConfigError(f"{source}: layer {f.layer} format has head size {f.head_size}, the model "
                              f"{ident.head_size}")

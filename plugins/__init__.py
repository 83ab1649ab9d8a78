"""overdrive: efficient-inference research methods as plugins for vLLM, SGLang, Diffusers and transformers.

Importing this package is cheap and framework-free: it imports no engine and never initialises CUDA
(it runs inside every vLLM and SGLang process through their plugin entry points).

    import overdrive
    overdrive.list_methods()                      # every method from every installed plugin
    overdrive.get_method("mbq")                   # UnknownMethodError lists the known names
    overdrive.diffusers.enable(pipe, "name", ...)  # explicit API where a framework has no entry points
"""
from __future__ import annotations

from typing import Any

from .config import ConfigError, MethodConfig
from .hookspecs import hookimpl
from .kinds import Kind
from .registry import OverdrivePluginWarning, UnknownMethodError, get_registry
from .spec import MethodCommand, MethodSpec

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "Kind", "MethodCommand", "MethodConfig", "MethodSpec", "OverdrivePluginWarning",
    "UnknownMethodError", "driver", "get_method", "get_registry", "hookimpl", "list_methods", "__version__",
]


def list_methods(kind: Kind | str | None = None) -> list[MethodSpec]:
    """Every installed method (optionally of one kind), sorted by kind and name."""
    return get_registry().methods(kind)


def get_method(name: str, kind: Kind | str | None = None) -> MethodSpec:
    """The method called ``name``; raises :class:`UnknownMethodError` listing the known ones."""
    return get_registry().get(name, kind)


def driver(kind: Kind | str, framework: str) -> Any:
    """The loop ``framework`` runs a method of ``kind`` with, where the framework drives the method itself
    (token routing: the transformers reference loop), from the adapter catalogue; imported on use, so a
    method can offer it without importing an adapter."""
    from overdrive.adapters import ADAPTERS, adapter

    from .spec import _resolve

    kind = Kind.parse(kind)
    info = adapter(framework)
    if kind not in info.drivers:
        raise KeyError(f"{framework} has no driver for {kind.value} methods; frameworks with one: "
                       f"{', '.join(a.framework for a in ADAPTERS if kind in a.drivers) or 'none'}")
    return _resolve(info.drivers[kind])


def __getattr__(name: str) -> Any:
    # `overdrive.diffusers` / `overdrive.transformers` are explicit framework APIs, imported on use.
    if name in ("diffusers", "transformers"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

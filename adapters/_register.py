"""What every engine ``register()`` shares: once per process, version gate, in-tree guard, trace.

``register()`` functions run in every engine process (API server, engine core, workers), so they are
idempotent, import their framework lazily, never initialise CUDA, and are silent when the framework
is absent. ``OVERDRIVE_TRACE=/path/file.jsonl`` appends one JSON line per registration (process id,
framework, names registered, names skipped) so tests and users can see that overdrive ran inside
each engine process.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
import time
from typing import Callable

from . import adapter, force_override

log = logging.getLogger("overdrive")

_done: dict[str, list[str]] = {}
_lock = threading.Lock()


def run_once(framework: str, import_name: str, body: Callable[[], tuple[list[str], list[str]]]) -> list[str]:
    """Run ``body`` once per process for ``framework``; returns the names it registered.

    ``body`` returns (registered, skipped-with-reason). Absent framework: quiet no-op. Framework
    outside the tested range: one plain warning, nothing registered (unless OVERDRIVE_ALLOW_UNTESTED=1).
    """
    with _lock:
        if framework in _done:
            return _done[framework]
        if importlib.util.find_spec(import_name) is None:
            _done[framework] = []
            return []
        status = adapter(framework).status()
        if not status.usable:
            log.warning("overdrive: %s", status.describe())
            _done[framework] = []
            _trace(framework, [], [f"* ({status.describe()})"])
            return []
        registered, skipped = body()
        _done[framework] = registered
        if registered:
            log.info("overdrive: registered %s into %s (pid %d)", ", ".join(registered), framework, os.getpid())
        _trace(framework, registered, skipped)
        return registered


def keep_intree(framework: str, name: str, intree: bool) -> str | None:
    """Reason to skip ``name`` because the engine already has a method of that name, else None."""
    if intree and not force_override(name):
        msg = (f"{framework} already has an in-tree method {name!r}; overdrive's is not registered "
               f"(set OVERDRIVE_OVERRIDE_INTREE={name} to replace it)")
        log.warning("overdrive: %s", msg)
        return f"{name} ({msg})"
    return None


def _trace(framework: str, registered: list[str], skipped: list[str]) -> None:
    path = os.environ.get("OVERDRIVE_TRACE")
    if not path:
        return
    import multiprocessing

    line = json.dumps({"framework": framework, "pid": os.getpid(), "ppid": os.getppid(),
                       "argv0": os.path.basename(sys.argv[0]) if sys.argv else "",
                       "process": multiprocessing.current_process().name,
                       "time": time.time(), "registered": registered, "skipped": skipped})
    with open(path, "a") as f:  # one short O_APPEND write per process: safe across processes
        f.write(line + "\n")


def reset_for_tests() -> None:
    with _lock:
        _done.clear()


def register_generated(framework: str, specs: list, build: Callable[[object], dict[str, type]],
                       install: Callable[..., None], *, is_intree: Callable[[str], bool],
                       module: str, classes: dict[str, type],
                       is_ours: Callable[[str], bool] = lambda name: False) -> tuple[list[str], list[str]]:
    """Register classes generated per method spec into one engine; returns (registered, skipped).

    The one registration helper of every engine adapter (vLLM, SGLang, transformers, diffusers):
    for each spec, ``is_ours(name)``: overdrive already registered it (skipped silently);
    ``is_intree(name)``: the engine has a method of that name, kept unless forced (see
    :func:`keep_intree`); otherwise ``build(spec)`` returns the generated classes keyed by a suffix
    (``{"Config": cls}``, ``{"HfConfig": c, "HfQuantizer": q}``), each named
    ``Overdrive<Method><suffix>`` in ``module`` and kept in ``classes`` (see :func:`resolve_generated`),
    then ``install(name, *classes_in_order)`` puts them into the engine's registry.
    """
    registered: list[str] = []
    skipped: list[str] = []
    for spec in specs:
        if is_ours(spec.name):
            continue
        reason = keep_intree(framework, spec.name, is_intree(spec.name))
        if reason:
            skipped.append(reason)
            continue
        built = build(spec)
        for suffix, cls in built.items():
            cls.__name__ = cls.__qualname__ = generated_name(spec.name, suffix)
            cls.__module__ = module
            classes[cls.__name__] = cls
        install(spec.name, *built.values())
        registered.append(spec.name)
    return registered, skipped


def two_map_checks(mapping: dict, config_mapping: dict) -> dict[str, Callable[[str], bool]]:
    """``is_ours``/``is_intree`` for :func:`register_generated` in an engine whose quantizers live in
    two name-keyed maps (transformers, diffusers): quantizer classes and config classes."""
    return {"is_ours": lambda name: getattr(mapping.get(name), "overdrive_method", None) == name,
            "is_intree": lambda name: name in mapping or name in config_mapping}


def generated_name(method: str, suffix: str) -> str:
    """``Overdrive<Method><suffix>``: the class name a generated engine class has in its adapter module."""
    return "Overdrive" + "".join(p.capitalize() for p in method.split("_")) + suffix


def resolve_generated(module: str, name: str, classes: dict[str, type], register: Callable[[], object]) -> type:
    """Body of an adapter module's ``__getattr__``: a class named by :func:`register_generated`,
    registering first, so the name resolves in a fresh process (engines pickle their config classes
    by reference into worker processes)."""
    if name.startswith("Overdrive"):
        register()
        if name in classes:
            return classes[name]
    raise AttributeError(f"module {module!r} has no attribute {name!r}")

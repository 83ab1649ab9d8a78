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


def register_quantizers(framework: str, specs: list, mapping: dict, config_mapping: dict,
                        build: Callable[[object], tuple[type, type]],
                        install: Callable[[str, type, type], None]) -> tuple[list[str], list[str]]:
    """Register one (config class, quantizer class) per method spec into a framework whose quantizers
    live in two name-keyed maps (transformers, diffusers); never shadows a framework quantizer of the
    same name unless forced, and skips names already registered by overdrive."""
    registered: list[str] = []
    skipped: list[str] = []
    for spec in specs:
        existing = mapping.get(spec.name)
        if getattr(existing, "overdrive_method", None) == spec.name:
            continue
        reason = keep_intree(framework, spec.name, existing is not None or spec.name in config_mapping)
        if reason:
            skipped.append(reason)
            continue
        config_cls, quantizer_cls = build(spec)
        install(spec.name, config_cls, quantizer_cls)
        registered.append(spec.name)
    return registered, skipped


def name_classes(method: str, tag: str, module: str, classes: dict[str, type],
                 config_cls: type, quantizer_cls: type) -> tuple[type, type]:
    """Name a built (config, quantizer) pair ``Overdrive<Method><tag>Config`` / ``...Quantizer`` in
    ``module`` (what reprs and pickling show) and keep them in ``classes`` for :func:`lazy_class`."""
    cname = "".join(p.capitalize() for p in method.split("_"))
    for cls, kind in ((config_cls, "Config"), (quantizer_cls, "Quantizer")):
        cls.__name__ = cls.__qualname__ = f"Overdrive{cname}{tag}{kind}"
        cls.__module__ = module
        classes[cls.__name__] = cls
    return config_cls, quantizer_cls


def lazy_class(module: str, tag: str, classes: dict[str, type], register: Callable[[], object], name: str) -> type:
    """Body of an adapter module's ``__getattr__``: a class named by :func:`name_classes`, registering
    the quantizers on first access (so the name resolves in a fresh process, e.g. when unpickling)."""
    if name.startswith("Overdrive") and (name.endswith(f"{tag}Config") or name.endswith(f"{tag}Quantizer")):
        register()
        if name in classes:
            return classes[name]
    raise AttributeError(f"module {module!r} has no attribute {name!r}")

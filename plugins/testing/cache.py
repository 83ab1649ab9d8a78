"""Deterministic, cached, atomically built fixture artifacts.

An artifact lives in ``$OVERDRIVE_CACHE_DIR`` (default ``~/.cache/overdrive/fixtures``) under
``<name>-<hash>``, the hash covering the builder's parameters and version. It is built in a temporary
folder beside it and renamed into place, so an interrupted build leaves nothing that looks finished,
and two processes racing on the same artifact both end up using one complete copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

ENV = "OVERDRIVE_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "overdrive" / "fixtures")


def cached_build(name: str, params: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return the folder of artifact ``name`` for ``params``, calling ``build(tmpdir)`` if missing."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = cache_root()
    final = root / f"{name}-{key}"
    if (final / ".complete").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.", dir=root))
    try:
        build(tmp)
        (tmp / ".complete").write_text(json.dumps(params, sort_keys=True, default=str) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / ".complete").is_file():  # not a lost race: a stale, incomplete folder
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final

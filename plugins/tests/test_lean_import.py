"""Importing overdrive and every adapter module imports no engine and initialises no CUDA.

These modules are imported in every vLLM/SGLang process through entry points: an eager engine
import or a CUDA context there would slow down or break every engine start.
"""
from __future__ import annotations

from pathlib import Path

from overdrive.testing.probe import run_probe


def test_import_overdrive_and_adapters_is_lean():
    r = run_probe(Path(__file__).parent / "probes" / "lean_import.py", timeout=120).result
    assert r["modules"] == [], f"engine modules imported eagerly: {r['modules']}"
    assert r["cuda_initialized"] is False

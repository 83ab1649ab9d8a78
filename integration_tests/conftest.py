from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from overdrive.testing.distributions import install_example_plugin


@pytest.fixture(scope="session")
def example_plugin_root(tmp_path_factory) -> Path:
    """examples/third_party_plugin installed as a distribution in a folder (for PYTHONPATH)."""
    return install_example_plugin(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="session")
def plugin_env(example_plugin_root) -> dict[str, str]:
    """Environment for engine subprocesses in which the example plugin is installed."""
    pp = os.pathsep.join(p for p in (str(example_plugin_root), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": pp, "HF_HUB_OFFLINE": "1", "OVERDRIVE_PROGRESS": "0"}


@pytest.fixture
def example_registry(example_plugin_root, monkeypatch):
    import overdrive

    monkeypatch.syspath_prepend(str(example_plugin_root))
    yield overdrive.get_registry(reload=True)
    sys.path[:] = [p for p in sys.path if p != str(example_plugin_root)]
    overdrive.get_registry(reload=True)


@pytest.fixture(scope="module")
def pipes():
    """``pipes(family)``: one tiny diffusers pipeline per family, built on first use, shared by a test module."""
    from overdrive.testing import tiny_pipeline

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_pipeline(family)
        return cache[family]
    return get

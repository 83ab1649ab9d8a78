from __future__ import annotations

import sys
import warnings

import pytest

import overdrive
from overdrive.testing.distributions import install_example_plugin


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """examples/third_party_plugin visible as an installed distribution; registry reloaded."""
    root = install_example_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    reg = overdrive.get_registry(reload=True)
    yield reg
    sys.path.remove(str(root)) if str(root) in sys.path else None
    for mod in [m for m in sys.modules if m.startswith("overdrive_example")]:
        del sys.modules[mod]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overdrive.get_registry(reload=True)

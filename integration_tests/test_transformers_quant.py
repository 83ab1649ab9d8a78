"""transformers loads an overdrive checkpoint through the registered quantizer and generates.

Runs in a subprocess: transformers' quantizer registry is process-global and registration is once
per process. Reference: the same checkpoint dequantized to float32 nn.Linear weights.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from overdrive.testing.probe import child_env, run_probe

PROBES = Path(__file__).parent / "probes"


@pytest.mark.slow  # ~20 s: builds, quantizes and loads two checkpoints in a fresh process
def test_transformers_loads_and_generates_through_registered_quantizer(plugin_env):
    out = run_probe(PROBES / "transformers_quant.py", env=child_env(plugin_env)).result
    assert out["registered"] == "OverdriveExampleW8HfQuantizer"
    assert out["layer"] == "OverdriveLinear" and out["qweight"] == "torch.int8"
    assert out["lm_head"] == "Linear"  # skipped by the method's config: stays a plain layer
    assert out["err"] < 1e-4
    assert out["tokens"] == out["ref"]

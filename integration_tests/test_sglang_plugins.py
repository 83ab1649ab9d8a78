"""SGLang's real plugin loader loads overdrive; its registries then hold overdrive's method names,
and the generic linear method built on SGLang's own base classes computes the right product."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from overdrive.kinds import Kind
from overdrive.registry import get_registry
from overdrive.testing.probe import child_env, run_probe

PROBES = Path(__file__).parent / "probes"


@pytest.mark.slow  # imports SGLang in a fresh process
def test_sglang_load_plugins_registers_overdrive_methods(plugin_env, tmp_path):
    trace = tmp_path / "trace.jsonl"
    out = run_probe(PROBES / "sglang_plugins.py", env=child_env({**plugin_env, "OVERDRIVE_TRACE": str(trace)})).result
    assert out["in_registry"] and out["in_choices"] == 1
    assert out["err"] < 1e-4
    assert out["mbq_err"] < 1e-4 and out["mbq_choice"]
    assert out["skipped"] == "UnquantizedLinearMethod"
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    (sglang,) = [x["registered"] for x in lines if x["framework"] == "sglang"]
    # the weight-quantization methods (the example's, MBQ, PCDVQ, ...), then every KV-cache method (the
    # example's, PM-KVQ, MoA, ...)
    wq = {s.name for s in get_registry().methods(Kind.WEIGHT_QUANT)} | {"example_w8"}
    kv = {s.name for s in get_registry().methods(Kind.KV_CACHE)} | {"example_int8kv"}
    assert {"mbq", "example_w8"} <= wq
    assert sorted(sglang[:len(wq)]) == sorted(wq) and sorted(sglang[len(wq):]) == sorted(kv)

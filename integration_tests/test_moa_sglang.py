"""MoA in SGLang 0.5.23 on CPU: the backend is in SGLang's real attention registry and CLI choices, and its forward
(per-head span attention over SGLang's real KV pools) equals float64 attention with the plan's spans step by step.
SGLang's server needs CUDA, so no server is started."""
from __future__ import annotations

from pathlib import Path

import pytest

from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.moa import make_plan
from overdrive.testing.probe import child_env, run_probe

PROBES = Path(__file__).parent / "probes"


@pytest.mark.slow  # imports SGLang in a fresh process
def test_sglang_registry_and_span_semantics(tmp_path):
    plan = tmp_path / "moa.json"
    make_plan(ModelIdentity("LlamaForCausalLM", 1, 4, 2, 32), [[3.0, -6.0]], [[0.25, 0.625]], sink=3,
              min_span=5).save(plan)
    res = run_probe(PROBES / "sglang_kv_spans.py", "moa", str(plan), env=child_env(engine=True)).result
    assert res["registered"] and res["choices"] == 1 and res["cli"] == "moa"
    assert res["lens"] == [38, 24]
    assert res["max_err"] < 1e-5, res
    assert res["dense_gap"] > 1e-2  # the spans dropped keys that mattered: the comparison is not vacuous

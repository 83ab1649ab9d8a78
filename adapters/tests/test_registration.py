"""Engine register() functions: once per process, version gate, in-tree guard, quiet when absent.

Each case runs in a fresh subprocess, because engine registries are process-global.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from overdrive.testing.distributions import install_distribution, install_example_plugin
from overdrive.testing.probe import child_env, run_probe

PROBES = Path(__file__).parent / "probes"


def probe(name: str, site, **env):
    return run_probe(PROBES / f"{name}.py", env=child_env({"PYTHONPATH": str(site), **env}))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = install_example_plugin(tmp_path_factory.mktemp("site"))
    # a plugin offering a weight-quant method whose name collides with vLLM's in-tree "awq"
    install_distribution(root, "awq-clash", "0.1", {"overdrive.plugins": {"clash": "awq_clash"}},
                         {"awq_clash": (PROBES / "awq_clash.py").read_text()})
    return root


@pytest.mark.slow  # imports vLLM in a fresh process
def test_vllm_register_is_idempotent_and_keeps_intree_names(site, tmp_path):
    trace = tmp_path / "t.jsonl"
    run = probe("vllm_register", site, OVERDRIVE_TRACE=str(trace))
    out = run.result
    assert out["lazy"] and out["n_same"] and out["count"] == 1 and out["cls"] == "OverdriveExampleW8Config"
    assert out["pickled"]
    assert out["awq_is_ours"] is None  # vLLM's in-tree AWQ is not shadowed
    assert "already has an in-tree method 'awq'" in run.stderr
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["registered"][:2] == ["example_w8", "mbq"]
    assert "pmkvq" in lines[0]["registered"]  # KV-cache methods register attention backends


@pytest.mark.slow
def test_vllm_intree_override_is_explicit(site):
    assert probe("vllm_register", site, OVERDRIVE_OVERRIDE_INTREE="awq").result["awq_is_ours"] == "awq"


@pytest.mark.slow
def test_untested_engine_version_is_refused_plainly(site):
    run = probe("vllm_version_gate", site)
    assert run.result["registered"] is False
    assert "outside overdrive's tested range >=99" in run.stderr and "OVERDRIVE_ALLOW_UNTESTED=1" in run.stderr
    assert probe("vllm_version_gate", site, OVERDRIVE_ALLOW_UNTESTED="1").result["registered"] is True


def test_absent_framework_is_a_quiet_noop(site):
    run = probe("absent_engine", site)
    assert run.result == {"r": [], "calls": []} and "overdrive" not in run.stderr

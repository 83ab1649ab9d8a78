"""Engine register() functions: once per process, version gate, in-tree guard, quiet when absent.

Each case runs in a fresh subprocess, because engine registries are process-global.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from overdrive.testing.distributions import install_distribution, install_example_plugin

# A plugin offering a weight-quant method whose name collides with vLLM's in-tree "awq".
AWQ_PLUGIN = textwrap.dedent("""
    import dataclasses, overdrive
    from overdrive import Kind, MethodConfig, MethodSpec

    @dataclasses.dataclass
    class Cfg(MethodConfig):
        pass

    @overdrive.hookimpl
    def overdrive_methods():
        return [MethodSpec(name="awq", kind=Kind.WEIGHT_QUANT, config_cls=Cfg, paper="-",
                           impl="overdrive_example.w8:METHOD")]
""")


def run_probe(code: str, site, **env) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(site), **env})
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["stderr"] = r.stderr
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = install_example_plugin(tmp_path_factory.mktemp("site"))
    install_distribution(root, "awq-clash", "0.1", {"overdrive.plugins": {"clash": "awq_clash"}},
                         {"awq_clash": AWQ_PLUGIN})
    return root


VLLM_PROBE = """
    import json, sys
    from overdrive.adapters import vllm as adapter
    from vllm.model_executor.layers import quantization as q
    first = adapter.register(); n = len(q.QUANTIZATION_METHODS)
    lazy = "overdrive_example.w8" not in sys.modules  # registration imported no method code
    adapter.register(); adapter.register()
    cls = q.get_quantization_config("example_w8")
    import pickle  # engines pickle the config into worker processes
    inst = cls.from_config({"quant_method": "example_w8", "skip": ["x"]})
    again = pickle.loads(pickle.dumps(inst))
    assert type(again) is cls and again.overdrive_cfg == inst.overdrive_cfg
    print(json.dumps({"lazy": lazy, "n_same": n == len(q.QUANTIZATION_METHODS), "count": q.QUANTIZATION_METHODS.count("example_w8"),
                      "cls": cls.__name__, "awq_is_ours": getattr(q.get_quantization_config("awq"), "overdrive_method", None)}))
"""


def test_vllm_register_is_idempotent_and_keeps_intree_names(site, tmp_path):
    trace = tmp_path / "t.jsonl"
    out = run_probe(VLLM_PROBE, site, OVERDRIVE_TRACE=str(trace))
    assert out["lazy"] and out["n_same"] and out["count"] == 1 and out["cls"] == "OverdriveExampleW8Config"
    assert out["awq_is_ours"] is None  # vLLM's in-tree AWQ is not shadowed
    assert "already has an in-tree method 'awq'" in out["stderr"]
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["registered"][:2] == ["example_w8", "mbq"]
    assert "pmkvq" in lines[0]["registered"]  # KV-cache methods register attention backends


def test_vllm_intree_override_is_explicit(site):
    out = run_probe(VLLM_PROBE, site, OVERDRIVE_OVERRIDE_INTREE="awq")
    assert out["awq_is_ours"] == "awq"


def test_untested_engine_version_is_refused_plainly(site, tmp_path):
    code = """
        import json, overdrive.adapters as a
        a.ADAPTERS = tuple(a.AdapterInfo(x.framework, x.module, x.distributions, ">=99" if x.framework == "vllm" else x.tested, x.kinds, x.surface) for x in a.ADAPTERS)
        from overdrive.adapters import vllm as adapter
        from vllm.model_executor.layers import quantization as q
        adapter.register()
        print(json.dumps({"registered": "example_w8" in q.QUANTIZATION_METHODS}))
    """
    out = run_probe(code, site)
    assert out["registered"] is False
    assert "outside overdrive's tested range >=99" in out["stderr"] and "OVERDRIVE_ALLOW_UNTESTED=1" in out["stderr"]
    out = run_probe(code, site, OVERDRIVE_ALLOW_UNTESTED="1")
    assert out["registered"] is True


def test_absent_framework_is_a_quiet_noop(site):
    code = """
        import json
        from overdrive.adapters._register import run_once
        calls = []
        r = run_once("vllm", "no_such_engine_module_xyz", lambda: calls.append(1) or (["x"], []))
        print(json.dumps({"r": r, "calls": calls}))
    """
    out = run_probe(code, site)
    assert out == {"r": [], "calls": [], "stderr": out["stderr"]} and "overdrive" not in out["stderr"]

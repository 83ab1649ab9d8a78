"""The overdrive CLI: list (derived matrix), doctor, method verbs, plugin commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import overdrive
from overdrive import cli
from overdrive.adapters import ADAPTERS, AdapterInfo
from overdrive.kinds import Kind


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_matrix_is_derived_from_kinds_and_adapters(example_plugin, capsys, monkeypatch):
    rc, out, _ = run_cli(capsys, "list", "--json")
    m = json.loads(out)
    rows = {x["name"]: x["frameworks"] for x in m["methods"]}
    assert rows["example_w8"] == {"vllm": "yes", "sglang": "yes", "diffusers": "-", "transformers": "yes"}
    assert rows["example_stepcache"] == {"vllm": "-", "sglang": "-", "diffusers": "yes", "transformers": "-"}
    # Take the weight-quant contract from the transformers adapter and give the DiT one to vLLM:
    # the matrix follows, nothing in it is hand-written.
    def kinds(a):
        if a.framework == "transformers":
            return {k: v for k, v in a.kinds.items() if k != Kind.WEIGHT_QUANT}
        return {**a.kinds, Kind.DIT_CACHE: "test"} if a.framework == "vllm" else a.kinds

    patched = tuple(AdapterInfo(a.framework, a.module, a.distributions, a.tested, kinds(a), a.surface)
                    for a in ADAPTERS)
    monkeypatch.setattr("overdrive.adapters.ADAPTERS", patched)
    rows2 = {x["name"]: x["frameworks"] for x in cli.methods_matrix()["methods"]}
    assert rows2["example_w8"]["transformers"] == "-" and rows2["example_stepcache"]["vllm"] == "yes"


def test_list_reports_untested_and_missing_frameworks(example_plugin, monkeypatch):
    patched = tuple(AdapterInfo(a.framework, a.module,
                                ("no-such-dist",) if a.framework == "sglang" else a.distributions,
                                "<0.1" if a.framework == "vllm" else a.tested, a.kinds, a.surface)
                    for a in ADAPTERS)
    monkeypatch.setattr("overdrive.adapters.ADAPTERS", patched)
    row = {x["name"]: x["frameworks"] for x in cli.methods_matrix()["methods"]}["example_w8"]
    assert row["vllm"] == "untested version" and row["sglang"] == "not installed"


def test_list_text_output(example_plugin, capsys):
    rc, out, _ = run_cli(capsys, "list")
    assert rc == 0
    assert "example_w8" in out and "weight_quantization" in out and "Kinds x frameworks" in out


def test_doctor_reports_versions_registration_and_problems(example_plugin, capsys):
    r = cli.doctor_report(try_register=False)
    assert r["packages"]["torch"] is not None
    assert set(r["frameworks"]) == {"vllm", "sglang", "diffusers", "transformers"}
    assert r["frameworks"]["vllm"]["entry_point_visible"] is True
    assert "example_w8" in r["methods"]
    assert r["kernel_backend"]["cpu"]
    wf = r["weight_formats"]  # which kernel serves each standard weight format here (vLLM's only when registering)
    assert set(wf["formats"]) == {"W4A16 g128 asymmetric", "W3A16 g128 asymmetric", "W8A8 per-channel symmetric",
                                  "W4A8 per-channel symmetric"}
    assert all(row["overdrive"].startswith("overdrive") and "vllm" not in row for row in wf["formats"].values())


def test_doctor_names_untested_engine_versions(example_plugin, monkeypatch, capsys):
    patched = tuple(AdapterInfo(a.framework, a.module, a.distributions,
                                ">=99" if a.framework == "diffusers" else a.tested, a.kinds, a.surface)
                    for a in ADAPTERS)
    monkeypatch.setattr("overdrive.adapters.ADAPTERS", patched)
    rc, out, _ = run_cli(capsys, "doctor", "--no-register")
    assert rc == 1
    assert "diffusers 0.42" in out and "outside overdrive's tested range >=99" in out
    assert "OVERDRIVE_ALLOW_UNTESTED=1" in out


def test_method_verb_unknown_method_lists_known(example_plugin, capsys):
    rc, _, err = run_cli(capsys, "quantize", "--method", "nope", "--model", "x")
    assert rc == 2 and "unknown method 'nope'" in err and "example_w8" in err


def test_method_verb_for_method_without_that_step(example_plugin, capsys):
    rc, _, err = run_cli(capsys, "quantize", "--method", "example_stepcache")
    assert rc == 2 and "has no 'quantize' step" in err and "example_w8" in err


def test_method_verb_help_shows_method_options(example_plugin, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--method", "example_w8", "--help"])
    assert e.value.code == 0
    assert "--skip" in capsys.readouterr().out


def test_plugin_can_add_a_top_level_command(capsys):
    calls = []

    class P:
        @overdrive.hookimpl
        def overdrive_cli_commands(self):
            return [cli.Command("hello", "say hello", lambda p: p.add_argument("--who", default="x"),
                                lambda a: calls.append(a.who) or 0)]

    reg = overdrive.get_registry()
    reg.pm.register(P(), name="hello-plugin")
    try:
        assert cli.main(["hello", "--who", "world"]) == 0
        assert calls == ["world"]
    finally:
        reg.pm.unregister(name="hello-plugin")


def test_console_script_is_installed():
    from pathlib import Path

    script = Path(sys.executable).parent / "overdrive"
    assert script.exists(), "the `overdrive` console script is not installed next to python"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"overdrive {overdrive.__version__}"


@pytest.mark.slow  # imports every engine in a fresh process
def test_doctor_command_registers_into_every_engine(tmp_path):
    """`overdrive doctor --json` as a user runs it, with a plugin installed: every adapter registers."""
    from overdrive.testing.distributions import install_example_plugin

    site = install_example_plugin(tmp_path / "site")
    script = Path(sys.executable).parent / "overdrive"
    r = subprocess.run([str(script), "doctor", "--json"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(site)})
    report = json.loads(r.stdout)
    assert r.returncode == 0, report["problems"]
    regs = {f: e.get("registers") for f, e in report["frameworks"].items()}
    from overdrive.kinds import Kind
    from overdrive.registry import get_registry

    # every built-in KV-cache method (PM-KVQ, MoA, ...) registers an attention backend in vLLM and SGLang
    kv = {s.name for s in get_registry().methods(Kind.KV_CACHE)} - {"example_int8kv"}
    assert {"pmkvq", "moa"} <= kv and kv <= set(regs["vllm"]) and kv <= set(regs["sglang"])
    assert "framefusion" in regs["vllm"]  # token reduction: a configuration hook (--additional-config)
    # vocabulary selection: a configuration hook + logits layer in vLLM
    vocab = {s.name for s in get_registry().methods(Kind.VOCAB)}
    assert vocab <= set(regs["vllm"])
    regs["vllm"] = [x for x in regs["vllm"] if x not in kv | vocab | {"framefusion"}]
    regs["sglang"] = [x for x in regs["sglang"] if x not in kv]
    # every built-in weight-quantization method (MBQ, PCDVQ, ...) is a quantization config in all three
    # engines; the example's KV-cache method registers an attention backend in vLLM and SGLang as well
    wq = {s.name for s in get_registry().methods(Kind.WEIGHT_QUANT)} | {"example_w8"}
    assert {"mbq", "pcdvq"} <= wq
    assert {f: sorted(v) if v is not None else None for f, v in regs.items()} == {
        "vllm": sorted(wq | {"example_int8kv"}), "sglang": sorted(wq | {"example_int8kv"}),
        "transformers": sorted(wq), "diffusers": None}

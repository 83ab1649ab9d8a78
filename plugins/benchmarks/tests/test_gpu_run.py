"""The one-command GPU run (overdrive.benchmarks.gpu): every part on CPU with tiny shapes, the budget and failure
isolation of the runner, the goal table, and the offline wheel preparation/installation (no download here)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from overdrive.benchmarks import gpu
from overdrive.benchmarks.gpu import GOALS, PARTS, Part, check_wheels, evaluate_goals, run_all

HEADER = ("benchmark", "date", "device", "commit", "versions")


def test_quick_cpu_run_executes_every_part_and_writes_reports(tmp_path):
    """`--quick --device cpu`: every part in its own process on tiny shapes, each report with the shared header,
    every goal evaluated from the reports, and the three files for the device tool in the pack folder. Two
    parts at a time (a CPU-only option) to keep it short on a 2-core machine."""
    out, pack = tmp_path / "run", tmp_path / "pack"
    t0 = time.monotonic()
    s = run_all(PARTS, out, 900, "cpu", quick=True, pack=pack, log=lambda m: None, jobs=2)
    took = time.monotonic() - t0
    st = {p["part"]: p for p in s["parts"]}
    assert list(st) == [p.name for p in PARTS]
    assert s["preflight"]["status"] == "ok" and not s.get("stopped"), s["preflight"]
    for name, rec in st.items():
        allowed = ("ok", "not available") if name == "calibration" else ("ok",)
        assert rec["status"] in allowed, (name, rec.get("why"), rec.get("log_tail"))
        if rec["status"] == "ok":
            report = json.loads((out / f"{name}.json").read_text())
            assert all(k in report for k in HEADER) and report["device"].startswith("CPU ("), name
            assert report["quick"] is True
    # every goal's part ran, so every goal is measured (met or not: tiny CPU shapes say nothing about speed)
    assert [g["goal"] for g in s["goals"]] == [g.name for g in GOALS]
    assert all(g["status"] in ("met", "not met") for g in s["goals"]), s["goals"]
    md = (out / "summary.md").read_text()
    assert all(g.text in md for g in GOALS) and "quick" in md
    assert sorted(p.name for p in pack.iterdir()) == ["gpu-run.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(pack / "gpu-run.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"gpu-run/{p}.json" for p in st if st[p]["status"] == "ok"} <= names
    assert "gpu-run/logs/gemv.log" in names
    assert not list(out.glob("*.partial.json"))  # rows-so-far files go once the full report is there
    print(f"quick CPU run: {took:.1f} s wall, {sum(p['cpu_seconds'] for p in s['parts']):.1f} s CPU in parts")


FAKE_PARTS = '''
import os, time
def ok(device, quick, out):
    return {"value": 42}
def boom(device, quick, out):
    raise ValueError("planted failure")
def hang(device, quick, out):
    time.sleep(600)
def crash(device, quick, out):
    os._exit(3)
def absent(device, quick, out):
    return {"status": "not available", "why": "nothing to run"}
def rows_then_hang(device, quick, out):
    import json
    rows = [{"scheme": "W3 g128", "k": 64, "n": 64, "m": 1, "speedup_vs_bf16": 2.5, "of_copy_floor": 0.7},
            {"scheme": "W4 g128", "k": 64, "n": 64, "m": 1, "speedup_vs_bf16": 1.5, "of_copy_floor": 0.8}]
    (out / "gemv.partial.json").write_text(json.dumps({"results": rows}))
    time.sleep(600)
'''


@pytest.fixture()
def fake_env(tmp_path):
    (tmp_path / "odfakeparts.py").write_text(FAKE_PARTS)
    import os

    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _p(name: str, func: str, cap: int = 60) -> Part:
    return Part(name, f"odfakeparts:{func}", 1, cap, func)


def test_a_part_that_hangs_raises_or_crashes_is_recorded_and_the_rest_run(tmp_path, fake_env):
    parts = [_p("hang", "hang", cap=3), _p("boom", "boom"), _p("crash", "crash"), _p("absent", "absent")]
    t0 = time.monotonic()
    s = run_all(parts, tmp_path / "out", 120, "cpu", quick=False, env=fake_env, preflight=None, reserve_s=0.5,
                min_s=0.5, goals=(), log=lambda m: None)
    st = {p["part"]: p for p in s["parts"]}
    assert st["hang"]["status"] == "timed out" and 3 <= st["hang"]["seconds"] < 15
    assert st["boom"]["status"] == "failed" and "ValueError: planted failure" in st["boom"]["log_tail"]
    assert st["crash"]["status"] == "failed" and st["crash"]["rc"] == 3
    assert st["absent"]["status"] == "not available" and st["absent"]["why"] == "nothing to run"
    report = json.loads((tmp_path / "out" / "absent.json").read_text())  # a part's report: the header, then its body
    assert report["status"] == "not available" and all(k in report for k in HEADER) and report["part"] == "absent"
    assert time.monotonic() - t0 < 90
    # the summary on disk is the returned one, and its table lists every part
    disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["status"] for p in disk["parts"]] == ["timed out", "failed", "failed", "not available"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| hang | timed out |" in md and "| absent | not available |" in md


def test_a_part_cut_off_keeps_the_rows_it_measured_for_the_goals(tmp_path, fake_env):
    s = run_all([Part("gemv", "odfakeparts:rows_then_hang", 1, 3, "gemv rows, then a hang")], tmp_path / "out", 60,
                "cpu", quick=False, env=fake_env, preflight=None, reserve_s=0.5, min_s=0.5, log=lambda m: None)
    (rec,) = s["parts"]
    assert rec["status"] == "timed out" and rec["partial_json"] == "gemv.partial.json"
    g = {x["goal"]: x for x in s["goals"]}
    assert (g["gemv_m1_speed"]["status"], g["gemv_m1_speed"]["value"]) == ("not met", 1.5)  # worst of 2.5, 1.5
    assert (g["gemv_m1_copy"]["status"], g["gemv_m1_copy"]["value"]) == ("met", 0.7)
    assert "timed out" in g["gemv_m1_speed"]["partial"]
    assert g["gemm_m256"]["status"] == "not run"  # no M = 256 row was measured before the cut
    assert "(partial)" in (tmp_path / "out" / "summary.md").read_text()


def test_a_broken_preflight_does_not_cost_the_parts(tmp_path, fake_env):
    """The preflight itself raising (overdrive importable from this tree) is reported and the parts still run."""
    logs = []
    s = run_all([_p("absent", "absent")], tmp_path / "out", 60, "cpu", quick=False, env=fake_env,
                preflight=_p("preflight", "boom"), reserve_s=0.5, min_s=0.5, goals=(), log=logs.append)
    assert s["preflight"]["status"] == "failed" and not s.get("stopped")
    assert [p["status"] for p in s["parts"]] == ["not available"]
    assert any("going on with the parts" in m for m in logs)


def test_the_budget_cuts_a_long_part_and_leaves_the_next_unrun(tmp_path, fake_env):
    parts = [_p("hang", "hang", cap=100), _p("ok", "ok")]
    t0 = time.monotonic()
    s = run_all(parts, tmp_path / "out", 4, "cpu", quick=False, env=fake_env, preflight=None, reserve_s=0.5,
                min_s=2, goals=(), log=lambda m: None)
    hang, ok = s["parts"]
    assert hang["status"] == "timed out" and hang["timeout_s"] == pytest.approx(3.5, abs=0.3)
    assert ok["status"] == "not run" and "out of budget" in ok["why"]
    assert time.monotonic() - t0 < 20


def test_parts_share_no_gpu(tmp_path):
    with pytest.raises(ValueError, match="one at a time"):
        run_all(PARTS, tmp_path, 10, "cuda", quick=True, jobs=2)


def test_a_cuda_run_without_cuda_stops_after_the_preflight(tmp_path, capsys):
    """`--preflight --device cuda` on a machine without CUDA: exit code 1, the missing GPU listed, nothing run."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu.main(["--preflight", "--device", "cuda", "--quick", "--out", str(tmp_path / "out")]) == 1
    assert "MISS cuda device" in capsys.readouterr().out
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["parts"] == [] and "no CUDA device" in s["stopped"]
    checks = {c["name"]: c for c in s["preflight"]["checks"]}
    assert checks["cuda device"]["ok"] is False and checks["cuda device"]["required"] is True
    assert checks["overdrive from this tree"]["ok"] is True
    assert "cuda device" in s["preflight"]["missing"]
    assert all(g["status"] == "not run" for g in s["goals"])


def _gemv_report(speed_m1: dict, copy_m1: dict, speed_m256: dict) -> dict:
    rows = []
    for (scheme, k, n), v in speed_m1.items():
        rows.append({"scheme": scheme, "k": k, "n": n, "m": 1, "speedup_vs_bf16": v,
                     "of_copy_floor": copy_m1[(scheme, k, n)]})
    for (scheme, k, n), v in speed_m256.items():
        rows.append({"scheme": scheme, "k": k, "n": n, "m": 256, "speedup_vs_bf16": v, "of_copy_floor": 0.1})
    rows.append({"scheme": "W3 g128", "k": 1, "n": 1, "m": 16, "speedup_vs_bf16": 0.01, "of_copy_floor": 0.01})
    rows.append({"scheme": "W4A8", "k": 1, "n": 1, "m": 256, "speedup_vs_bf16": 0.01})  # not in the M=256 goal
    return {"results": rows}


def test_goals_take_the_worst_case_of_the_rows_they_name(tmp_path):
    (tmp_path / "gemv.json").write_text(json.dumps(_gemv_report(
        {("W3 g128", 4096, 4096): 2.5, ("W4 g128", 4096, 14336): 2.1},
        {("W3 g128", 4096, 4096): 0.7, ("W4 g128", 4096, 14336): 0.55},
        {("W4 g128", 4096, 4096): 1.2, ("W8A8", 4096, 4096): 1.0})))
    kv = [{"op": "kv_decode_attention", "shape": f"{b}-bit R={r} ctx={c} Hq=32 Hk=8", "speedup_vs": {"sdpa": v}}
          for b, r, c, v in ((4, 1, 32768, 1.7), (4, 32, 32768, 1.4), (4, 32, 4096, 0.2), (2, 1, 32768, 0.1))]
    (tmp_path / "pmkvq_decode.json").write_text(json.dumps({"results": kv}))
    (tmp_path / "ditfastattn_e2e.json").write_text(json.dumps({"rows": [
        {"config": "none", "speedup": 1.0, "median_s": 2.0},
        {"config": gpu.DITFASTATTN_GOAL_ROW, "speedup": 1.6, "median_s": 1.25}]}))
    parts = {n: {"status": "ok"} for n in ("gemv", "pmkvq_decode", "ditfastattn_e2e")}
    parts["viditq"] = {"status": "timed out"}
    g = {x["goal"]: x for x in evaluate_goals(tmp_path, parts)}
    assert (g["gemv_m1_speed"]["status"], g["gemv_m1_speed"]["value"]) == ("met", 2.1)
    assert (g["gemv_m1_copy"]["status"], g["gemv_m1_copy"]["value"]) == ("not met", 0.55)
    assert (g["gemm_m256"]["status"], g["gemm_m256"]["value"]) == ("met", 1.0)  # equal to the target meets it
    # the longest context only (32k), every batch: 1.4 < 1.5
    assert (g["pmkvq_4bit"]["status"], g["pmkvq_4bit"]["value"]) == ("not met", 1.4)
    assert (g["ditfastattn_e2e"]["status"], g["ditfastattn_e2e"]["value"]) == ("met", 1.6)
    assert g["viditq_w8a8"]["status"] == "not run" and "timed out" in g["viditq_w8a8"]["why"]
    assert g["moa_span"]["status"] == "not run"  # its part never ran


def test_goal_on_a_report_without_its_rows_is_not_run(tmp_path):
    (tmp_path / "gemv.json").write_text(json.dumps({"results": [{"scheme": "W8A8", "m": 1, "k": 1, "n": 1,
                                                                 "speedup_vs_bf16": 9.0}]}))
    g = {x["goal"]: x for x in evaluate_goals(tmp_path, {"gemv": {"status": "ok"}})}
    assert g["gemv_m1_speed"]["status"] == "not run" and "W3/W4 M=1" in g["gemv_m1_speed"]["why"]


# -------------------------------------------------------------------------------------- wheels, install
def _fake_wheel(folder: Path, name: str, version: str, payload: bytes = b"") -> Path:
    """A valid pure-Python wheel holding module ``name`` (VALUE = 7) and an optional payload file."""
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    di = f"{name}-{version}.dist-info"
    files = {f"{name}.py": b"VALUE = 7\n", f"{name}_data.bin": payload,
             f"{di}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{di}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},,\n" for p in files) + f"{di}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
        z.writestr(f"{di}/RECORD", record)
    return whl


def test_prepare_wheels_downloads_each_missing_wheel_for_the_device_python(tmp_path):
    calls = []

    def fake_pip(cmd, check):  # stands in for the package index: "downloads" the wheel named by the spec
        calls.append(cmd)
        name, version = cmd[-1].split("==")
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), name, version)

    dest = tmp_path / "wheels"
    info = gpu.prepare_wheels(dest, ["odfake_a==1.0", "odfake_b==2.0"], python="PY", runner=fake_pip)
    assert [c[-1] for c in calls] == ["odfake_a==1.0", "odfake_b==2.0"]
    cmd = calls[0]
    assert cmd[:4] == ["PY", "-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--platform=manylinux_2_28_x86_64" in cmd
    assert info["wheels"] == ["odfake_a-1.0-py3-none-any.whl", "odfake_b-2.0-py3-none-any.whl"]
    assert info["problems"] == [] and info["total_mb"] < 1
    if info["commit"]:
        assert (dest / "COMMIT").read_text().strip() == info["commit"]
    calls.clear()
    gpu.prepare_wheels(dest, ["odfake_a==1.0", "odfake_b==2.0"], python="PY", runner=fake_pip)
    assert calls == []  # present wheels are kept: no network needed to refresh COMMIT


def test_carried_specs_pin_diffusers_as_the_requirements_do():
    specs = dict(s.split("==") for s in gpu.carried_specs())
    pins = (gpu.ROOT / "requirements" / "engines.txt").read_text()
    assert set(specs) == set(gpu.CARRIED) and f"diffusers=={specs['diffusers']}" in pins


def test_check_wheels_refuses_two_versions_and_too_many_bytes(tmp_path):
    _fake_wheel(tmp_path, "odfake", "1.0")
    _fake_wheel(tmp_path, "odfake", "1.1")
    _fake_wheel(tmp_path, "odbig", "1.0", payload=bytes(range(256)) * 8192)  # 2 MiB, stored uncompressed
    info = check_wheels(tmp_path, limit_mb=0.5)
    assert any("odfake: 2 versions" in p for p in info["problems"])
    assert any("over the 0.5 MB limit" in p for p in info["problems"])
    assert check_wheels(tmp_path)["problems"] == [p for p in info["problems"] if "versions" in p]
    with pytest.raises(SystemExit, match="2 versions"):
        gpu.install(tmp_path, log=lambda m: None)


def test_offline_install_of_carried_wheels_works_without_an_index(tmp_path):
    """The device's install commands, run for real with pip --no-index into a throwaway folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "odgpufake", "0.3")
    site = tmp_path / "site"
    cmds = gpu.install_commands(wheels, sys.executable, target=site, editable=gpu.ROOT)
    assert cmds[1][-3:] == ["--no-build-isolation", "-e", str(gpu.ROOT)] and "--no-index" in cmds[1]
    for flag in ("--no-index", "--no-deps"):
        assert flag in cmds[0]
    subprocess.run(cmds[0], check=True, env={"PIP_NO_INDEX": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    r = subprocess.run([sys.executable, "-c", "import odgpufake; print(odgpufake.VALUE)"], capture_output=True,
                       text=True, env={"PYTHONPATH": str(site)})
    assert r.stdout.strip() == "7", r.stderr


def test_the_bootstrap_runs_as_a_plain_file_without_torch():
    """`python plugins/benchmarks/gpu.py ...` is what the device runs before anything is installed: the file
    imports nothing but the standard library."""
    code = ("import runpy, sys\nsys.argv = ['gpu.py', '--list']\n"
            "try:\n    runpy.run_path(sys.argv_path, run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('RC', rc, 'torch' in sys.modules, 'overdrive' in sys.modules)")
    code = code.replace("sys.argv_path", repr(str(Path(gpu.__file__))))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=gpu.ROOT)
    assert "RC 0 False False" in r.stdout, r.stdout + r.stderr
    assert "pytest_gpu" in r.stdout and "total" in r.stdout


def test_calibration_part_calls_the_benchmark_with_fewer_samples_on_a_gpu_run(tmp_path, monkeypatch):
    import types

    from overdrive.benchmarks import gpu_parts

    seen = []
    fake = types.ModuleType("overdrive.benchmarks.calibration")
    fake.run = lambda device, quick, out_dir, samples=None: seen.append((device, quick, out_dir, samples)) or {"x": 1}
    monkeypatch.setitem(sys.modules, "overdrive.benchmarks.calibration", fake)
    assert gpu_parts.calibration("cuda", False, tmp_path)["x"] == 1
    assert gpu_parts.calibration("cpu", True, tmp_path) == {"x": 1}  # quick: the benchmark's own tiny shapes
    assert seen == [("cuda", False, tmp_path, gpu_parts.CALIBRATION_SAMPLES), ("cpu", True, tmp_path, None)]
    fake.run = lambda device, quick, out_dir: {"y": 2}  # the brief's signature only: called as is
    assert gpu_parts.calibration("cuda", False, tmp_path) == {"y": 2}


def test_a_tree_without_git_takes_the_commit_the_wheels_were_prepared_at(tmp_path, monkeypatch):
    (tmp_path / "COMMIT").write_text("0123abc\n")
    monkeypatch.setenv("OVERDRIVE_COMMIT", "")  # recorded, so what the test sets is undone afterwards
    monkeypatch.delenv("OVERDRIVE_COMMIT")
    monkeypatch.setattr(gpu, "_commit", lambda: "fedcba9")  # a git checkout: its own commit stands
    gpu.commit_from(tmp_path)
    assert "OVERDRIVE_COMMIT" not in __import__("os").environ
    monkeypatch.setattr(gpu, "_commit", lambda: None)  # a copy without .git (the GPU machine)
    gpu.commit_from(tmp_path)
    assert __import__("os").environ["OVERDRIVE_COMMIT"] == f"0123abc (from {tmp_path.name}/COMMIT)"

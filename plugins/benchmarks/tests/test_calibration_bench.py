"""The GPU calibration benchmark in --quick mode on the CPU: it runs end to end and reports what it promises."""
from __future__ import annotations

import json

from overdrive.benchmarks import calibration as bench


def test_quick_calibration_bench_on_cpu(tmp_path):
    r = bench.run("cpu", True, tmp_path)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["benchmark"] == "calibration" and saved["device"].startswith("CPU")
    assert r["blocks_onloaded_at_once"] == 1 and r["peak_fraction_of_bf16_model"] is None
    # one block in float32: q, k, v, o, gate, up, down and the two norms of the tiny shape
    h, f, kv = 128, 256, 2 * 32
    assert r["peak_block_param_bytes"] == 4 * (h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h)
    # 2 layers x (qkv, gate_up, down): grouped KV heads leave no v -> o group
    assert r["groups"] == 6 and r["all_losses_finite"] and r["calibration"]["tokens"] == 256


def test_main_writes_json(tmp_path):
    out = tmp_path / "c.json"
    assert bench.main(["--quick", "--device", "cpu", "--samples", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["calibration"]["samples"] == 2

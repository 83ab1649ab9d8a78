"""The benchmark harness runs and reports ratios and ceilings (no timing thresholds: behaviour only)."""
from __future__ import annotations

import json

import pytest

from overdrive.kernels import bench


@pytest.mark.slow  # ~20 s of interpreted kernels
def test_quick_bench_reports_ratios_and_ceilings(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "torch")
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"].startswith("CPU") and r["ceilings"]["bandwidth_gbs"] > 0 and r["ceilings"]["flops"] > 0
    ops = {x["op"] for x in r["results"]}
    assert ops == {"act8_linear", "group_linear", "int8_weight_linear", "unpack", "window_attention",
                   "kv_decode_attention", "kv_quantize", "kv_requantize"}
    for x in r["results"]:
        assert x["seconds"] > 0 and all(v > 0 for v in x["speedup_vs"].values())
        assert 0 < x["bandwidth_of_ceiling"]

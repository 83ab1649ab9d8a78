"""The benchmark harness runs and reports ratios and ceilings (no timing thresholds: behaviour only)."""
from __future__ import annotations

import json

import pytest

from overdrive.benchmarks import kernels as bench


@pytest.mark.slow  # ~20 s of interpreted kernels
def test_quick_bench_reports_ratios_and_ceilings(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "torch")
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"].startswith("CPU") and r["ceilings"]["bandwidth_gbs"] > 0 and r["ceilings"]["flops"] > 0
    ops = {x["op"] for x in r["results"]}
    assert ops == {"act8_linear", "group_linear", "int8_weight_linear", "unpack", "window_attention",
                   "kv_decode_attention", "kv_quantize", "kv_requantize", "span_prefill_attention",
                   "span_paged_attention"}
    for x in r["results"]:
        assert x["seconds"] > 0 and all(v > 0 for v in x["speedup_vs"].values())
        assert 0 < x["bandwidth_of_ceiling"]


def test_quick_gemv_bench_reports_ratios_against_bf16_and_copy(tmp_path, monkeypatch):
    from overdrive.benchmarks import kernels_gemv as bench_gemv

    monkeypatch.setenv("OVERDRIVE_KERNELS", "torch")
    out = tmp_path / "g.json"
    assert bench_gemv.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"].startswith("CPU") and r["ceilings"]["copy_gbs"] > 0 and r["goals"]
    assert {x["scheme"] for x in r["results"]} == {"W3 g128", "W4 g128", "W8A8", "W4A8"}
    for x in r["results"]:
        assert "error" not in x, x
        assert x["seconds"] > 0 and x["speedup_vs_bf16"] > 0 and x["of_copy_floor"] > 0
        # the weight bytes the op streams: W4 g128 = K*N/2 codes + (K/128)*N*(scale + float32 szero)
        if x["scheme"] == "W4 g128":
            assert x["weight_bytes"] == x["k"] * x["n"] // 2 + (x["k"] // 128) * x["n"] * (4 + 4)


"""The GPU benchmark's CPU path and its torch int8 alternative (the GPU numbers need a GPU)."""
from __future__ import annotations

import pytest
import torch

from overdrive.kernels import act8_linear_reference
from overdrive.benchmarks.viditq_gpu import int_mm_linear, run
from overdrive.viditq.numerics import quantize_weight


@pytest.mark.parametrize("smooth", [False, True])
def test_int_mm_linear_is_the_act8_arithmetic(smooth):
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(33, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    s = torch.rand(40, generator=g) + 0.5 if smooth else None
    qw, ws = quantize_weight(w, 8, s)
    got = int_mm_linear(x, qw, ws, b, smooth=s)
    want = act8_linear_reference(x, qw, ws, 8, b, smooth=s)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 vs float64 quantization arithmetic


@pytest.mark.slow
def test_gpu_script_quick_path_runs_on_cpu():
    res = run(quick=True, double=1, single=1, iters=1)
    assert set(res["denoiser"]) == {"bf16", "w8a8", "w4a8"}
    for scheme in ("w8a8", "w4a8"):
        e = res["denoiser"][scheme]
        assert 0 < e["rel_l2_vs_bf16"] < (0.05 if scheme == "w8a8" else 0.5)
        assert e["block_param_bytes"] < res["denoiser"]["bf16"]["block_param_bytes"] / 2
    assert res["linear"] and all(r["act8_triton_s"] > 0 for r in res["linear"])

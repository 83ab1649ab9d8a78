"""Vector-quantized linear (codebook gather x magnitude x scale) against a float64 loop; the Triton
kernel in the interpreter on sizes that are not multiples of its tiles."""
from __future__ import annotations

import pytest
import torch

from overdrive.kernels import vq_linear


def reference(x, d, m, s, cb, lv):
    n, v = d.shape
    w = torch.empty(n, 8 * v, dtype=torch.float64)
    for i in range(n):
        for j in range(v):
            w[i, 8 * j:8 * j + 8] = float(s[i]) * float(lv[m[i, j]]) * cb[d[i, j]].double()
    return x.double() @ w.T


def case(mrows, n, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(300, 8, generator=g)
    lv = torch.rand(4, generator=g) + 0.5
    d = torch.randint(0, 300, (n, v), generator=g, dtype=torch.int32)
    m = torch.randint(0, 4, (n, v), generator=g, dtype=torch.int32)
    s = torch.rand(n, generator=g)
    x = torch.randn(mrows, 8 * v, generator=g)
    return x, d, m, s, cb, lv


def test_torch_reference_matches_float64():
    x, d, m, s, cb, lv = case(3, 5, 6)
    torch.testing.assert_close(vq_linear(x.double(), d, m, s, cb, lv), reference(x, d, m, s, cb, lv),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("mrows,n,v", [(1, 37, 20), (3, 64, 16)])
def test_triton_kernel_in_the_interpreter_matches_float64(monkeypatch, mrows, n, v):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "interpret")
    x, d, m, s, cb, lv = case(mrows, n, v, seed=1)
    got = vq_linear(x, d, m, s, cb, lv)
    assert got.dtype == torch.float32 and got.shape == (mrows, n)
    torch.testing.assert_close(got.double(), reference(x, d, m, s, cb, lv), atol=1e-4, rtol=1e-4)


def test_shape_mismatch_is_an_error():
    x, d, m, s, cb, lv = case(1, 4, 4)
    with pytest.raises(ValueError, match="do not fit"):
        vq_linear(x[:, :24], d, m, s, cb, lv)

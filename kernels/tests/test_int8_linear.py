from __future__ import annotations

import pytest
import torch

from overdrive.kernels import int8_weight_linear, int8_weight_linear_reference

from .conftest import needs_cuda

SHAPES = [(1, 70, 33), (5, 128, 64), (17, 200, 65), (3, 1, 5), (16, 64, 130), (33, 96, 17)]


def _inputs(m, k, n, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) / 50 + 1e-3)
    b = torch.randn(n, generator=g) if bias else None
    return x, q, s, b


def _float64(x, q, s, b):
    y = x.double() @ (q.double() * s.double()[:, None]).T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_reference_against_float64(m, k, n):
    x, q, s, b = _inputs(m, k, n, torch.float32)
    torch.testing.assert_close(int8_weight_linear_reference(x, q, s, b).double(), _float64(x, q, s, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_kernel_in_interpreter(interpret, m, k, n, dtype, tol, bias):
    mod = interpret("int8_linear")
    x, q, s, b = _inputs(m, k, n, dtype, seed=m * k + n, bias=bias)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # unwritten elements stay NaN and fail
    got = mod.int8_weight_linear(x, q, s, b, out=out)
    ref = int8_weight_linear_reference(x, q, s, b)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got.double(), _float64(x, q, s, b), rtol=tol * 10, atol=tol * 10)


def test_leading_dims_and_dispatch(interpret):
    x, q, s, b = _inputs(6, 40, 24, torch.float32)
    x3 = x.reshape(2, 3, 40)
    got = int8_weight_linear(x3, q, s, b)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.reshape(6, 24).double(), _float64(x, q, s, b), rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    x, q, s, b = _inputs(2, 8, 4, torch.float32)
    with pytest.raises(TypeError, match="qweight must be a 2-D int8"):
        int8_weight_linear(x, q.float(), s)
    with pytest.raises(ValueError, match="x has 7 input features, qweight expects 8"):
        int8_weight_linear(x[:, :7], q, s)
    with pytest.raises(ValueError, match=r"scale must be a floating \(4,\) tensor"):
        int8_weight_linear(x, q, s[:3])
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        int8_weight_linear(x, q, s, b[:2])
    with pytest.raises(TypeError, match="x must be float16/bfloat16/float32"):
        int8_weight_linear(x.double(), q, s)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 4096, 11008), (512, 4096, 4096), (7, 333, 129)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_on_gpu(m, k, n, dtype):
    x, q, s, b = [t.cuda() if t is not None else None for t in _inputs(m, k, n, dtype)]
    got = int8_weight_linear(x, q, s, b)
    torch.testing.assert_close(got.double(), _float64(x, q, s, b), rtol=2e-2, atol=2e-2 * (k ** 0.5) / 8)

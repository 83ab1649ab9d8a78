from __future__ import annotations

import pytest
import torch

from overdrive.kernels import dequantize_reference, group_linear, group_linear_reference, pack

from .conftest import needs_cuda

# (M, K, N, group): M=1 decode and larger prefill, N not a multiple of the 64-wide tile, K with a
# partial 64-wide K tile (96, 160) and groups smaller than the K tile
SHAPES = [(1, 256, 33, 128), (5, 384, 70, 128), (17, 128, 65, 64), (3, 96, 5, 32), (16, 160, 130, 32), (33, 128, 17, 128)]


def _inputs(m, k, n, group, bits, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, k // group, generator=g) / 10 + 0.01).to(dtype)
    zeros = torch.randint(0, 1 << bits, (n, k // group), generator=g).to(torch.uint8)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    return codes, pack(codes, bits), scales, zeros, x, bias


def _float64(codes, scales, zeros, x, bias, group):
    w = (codes.double() - zeros.double().repeat_interleave(group, 1)) * scales.double().repeat_interleave(group, 1)
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("bits", [3, 4])
def test_dequantize_reference_closed_form(bits):
    codes, q, s, z, *_ = _inputs(1, 64, 3, 32, bits)
    w = dequantize_reference(q, s, z, bits, 32, 64)
    expected = (codes.double() - z.double().repeat_interleave(32, 1)) * s.double().repeat_interleave(32, 1)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n,group", SHAPES)
def test_reference_against_float64(bits, m, k, n, group):
    codes, q, s, z, x, b = _inputs(m, k, n, group, bits)
    torch.testing.assert_close(group_linear_reference(x, q, s, z, bits, group, b).double(),
                               _float64(codes, s, z, x, b, group), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n,group", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
def test_triton_kernel_in_interpreter(interpret, bits, m, k, n, group, dtype, tol):
    mod = interpret("group_linear")
    codes, q, s, z, x, b = _inputs(m, k, n, group, bits, dtype, seed=m + k + n)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # unwritten elements stay NaN
    got = mod.group_linear(x, q, s, z, bits, group, b, out=out)
    torch.testing.assert_close(got.double(), _float64(codes, s, z, x, b, group), rtol=tol, atol=tol * 10)
    ref = group_linear_reference(x, q, s, z, bits, group, b)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * 10)


def test_dispatch_and_leading_dims(interpret):
    codes, q, s, z, x, b = _inputs(6, 128, 24, 64, 3)
    got = group_linear(x.reshape(2, 3, 128), q, s, z, 3, 64, None)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.reshape(6, 24).double(), _float64(codes, s, z, x, None, 64), rtol=1e-4, atol=1e-4)


def test_bad_input_names_the_tensor():
    codes, q, s, z, x, b = _inputs(2, 128, 8, 64, 4)
    with pytest.raises(ValueError, match=r"qweight has shape \(8, 15\).*expected \(8, 16\)"):
        group_linear(x, q[:, :15], s, z, 4, 64)
    with pytest.raises(ValueError, match=r"zeros has shape \(8, 2\) and dtype torch.int64"):
        group_linear(x, q, s, z.long(), 4, 64)
    with pytest.raises(ValueError, match="input features 100 are not a multiple of group_size 64"):
        group_linear(x[:, :100], q, s, z, 4, 64)
    with pytest.raises(ValueError, match="bits=2 is not supported"):
        group_linear(x, q, s, z, 2, 64)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 4096, 11008), (256, 11008, 4096)])
def test_triton_kernel_on_gpu(bits, m, k, n):
    codes, q, s, z, x, b = _inputs(m, k, n, 128, bits, torch.float16)
    got = group_linear(x.cuda(), q.cuda(), s.cuda(), z.cuda(), bits, 128, b.cuda())
    torch.testing.assert_close(got.double().cpu(), _float64(codes, s, z, x, b, 128), rtol=2e-2, atol=0.5)

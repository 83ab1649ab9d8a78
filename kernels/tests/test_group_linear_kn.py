"""group_linear on the kernel layout: prepare closed form, reference and the Triton GEMV/GEMM (every
launch path: split-K 1 and > 1) in the interpreter against float64, on shapes that are not multiples
of the tiles."""
from __future__ import annotations

import pytest
import torch

from overdrive.kernels import (dequantize_kn_reference, group_linear_kn, group_linear_kn_reference, pack,
                               prepare_group_weight)

from .conftest import needs_cuda
from .test_group_linear import _float64


def _inputs(m, k, n, group, bits, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, k // group, generator=g) / 10 + 0.01).to(dtype)
    zeros = torch.randint(0, 1 << bits, (n, k // group), generator=g).to(torch.uint8)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    return codes, prepare_group_weight(pack(codes, bits), scales, zeros, bits, group), scales, zeros, x, bias


@pytest.mark.parametrize("bits", [3, 4])
def test_prepared_layout_closed_form(bits):
    codes, p, s, z, *_ = _inputs(1, 96, 5, 32, bits)
    assert p["qweight_kn"].shape == (96 // 32 * bits, 5) and p["qweight_kn"].is_contiguous()
    assert p["scales_kn"].shape == (3, 5) and p["szeros_kn"].dtype == torch.float32
    torch.testing.assert_close(p["szeros_kn"].double(), (z.double() * s.double()).T, rtol=1e-7, atol=0)
    want = (codes.double() - z.double().repeat_interleave(32, 1)) * s.double().repeat_interleave(32, 1)
    torch.testing.assert_close(dequantize_kn_reference(p["qweight_kn"], p["scales_kn"], p["szeros_kn"], bits, 32,
                                                       96).double(), want.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
def test_reference_against_float64(bits):
    codes, p, s, z, x, b = _inputs(5, 160, 33, 32, bits)
    got = group_linear_kn_reference(x, p["qweight_kn"], p["scales_kn"], p["szeros_kn"], bits, 32, b)
    torch.testing.assert_close(got.double(), _float64(codes, s, z, x, b, 32), rtol=1e-5, atol=1e-4)


# (M, K, N, group, config): GEMV (BM = 1) and GEMM, split-K 1 and > 1 (with a ragged last split),
# N not a multiple of BN, K not a multiple of BK
CASES = [
    (1, 96, 37, 32, (1, 32, 32, 1)),
    (1, 224, 70, 32, (1, 64, 32, 3)),
    (1, 128, 20, 64, (1, 16, 64, 2)),
    (3, 96, 37, 32, (16, 32, 32, 1)),
    (17, 160, 45, 32, (16, 32, 32, 2)),
    (5, 224, 33, 32, (16, 16, 64, 3)),
]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n,group,cfg", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 3e-2)])  # bf16 tl.dot is not emulated by the interpreter
def test_triton_kernels_in_interpreter(interpret, bits, m, k, n, group, cfg, dtype, tol):
    mod = interpret("group_linear")
    codes, p, s, z, x, b = _inputs(m, k, n, group, bits, dtype, seed=m * k + n)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # unwritten elements stay NaN
    got = mod.group_linear_kn(x, p["qweight_kn"], p["scales_kn"], p["szeros_kn"], bits, group, b, out=out,
                              config=mod.Config(*cfg))
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.double(), _float64(codes, s, z, x, b, group), rtol=tol, atol=tol * 10)


def test_default_configs_and_buckets(interpret):
    mod = interpret("group_linear")
    assert [mod.m_bucket(m) for m in (1, 2, 3, 16, 17, 64, 65, 300)] == [1, 2, 4, 16, 32, 64, 128, 512]
    assert mod.candidates(1, 4096, 4096)[0].bm == 1  # decode: the GEMV kernel
    assert all(c.bm >= 16 for c in mod.candidates(8, 4096, 4096))  # tl.dot tiles need 16 rows
    codes, p, s, z, x, b = _inputs(2, 64, 9, 32, 4)
    got = group_linear_kn(x.reshape(1, 2, 64), p["qweight_kn"], p["scales_kn"], p["szeros_kn"], 4, 32, b)
    assert got.shape == (1, 2, 9)
    torch.testing.assert_close(got.reshape(2, 9).double(), _float64(codes, s, z, x, b, 32), rtol=1e-4, atol=1e-4)


def test_bad_input_names_the_tensor():
    codes, p, s, z, x, b = _inputs(2, 128, 8, 64, 4)
    with pytest.raises(ValueError, match=r"qweight_kn has shape \(15, 8\).*expected \(16, 8\)"):
        group_linear_kn(x, p["qweight_kn"][:15], p["scales_kn"], p["szeros_kn"], 4, 64)
    with pytest.raises(ValueError, match=r"szeros_kn has shape \(2, 8\) and dtype torch.int64"):
        group_linear_kn(x, p["qweight_kn"], p["scales_kn"], p["szeros_kn"].long(), 4, 64)
    with pytest.raises(ValueError, match="input features 100 are not a multiple of group_size 64"):
        group_linear_kn(x[:, :100], p["qweight_kn"], p["scales_kn"], p["szeros_kn"], 4, 64)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (1, 4096, 14336), (16, 4096, 11008), (256, 11008, 4096)])
def test_compiled_kernels_on_gpu(bits, m, k, n):
    codes, p, s, z, x, b = _inputs(m, k, n, 128, bits, torch.bfloat16)
    got = group_linear_kn(x.cuda(), *(p[k_].cuda() for k_ in ("qweight_kn", "scales_kn", "szeros_kn")), bits, 128,
                          b.cuda())
    torch.testing.assert_close(got.double().cpu(), _float64(codes, s, z, x, b, 128), rtol=2e-2, atol=0.5)

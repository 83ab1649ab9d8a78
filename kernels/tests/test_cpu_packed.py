"""The packed CPU path (torch's int4/int8 CPU GEMMs) for W4/W3 group-wise and W8A8/W4A8 against a float64
dequantized reference, the layout chosen per dtype/device/switch, and the CPU feature probe."""
from __future__ import annotations

import pytest
import torch

from overdrive.kernels import (act8_linear_prepared, group_linear_prepared, pack, prepare_act8_linear,
                               prepare_group_linear)
from overdrive.kernels import cpu_packed

pytestmark = pytest.mark.skipif(not (cpu_packed.int4pack_available() and cpu_packed.int8pack_available()),
                                reason="this torch has no packed CPU GEMMs")


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "auto")
    monkeypatch.delenv("OVERDRIVE_CPU_PACKED", raising=False)


def _group_case(bits, group, dtype, m=5, k=192, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = (torch.rand(n, k // group, generator=g) / 10 + 0.01).to(dtype)
    zeros = torch.randint(0, 1 << bits, (n, k // group), generator=g).to(torch.uint8)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    w = (codes.double() - zeros.double().repeat_interleave(group, 1)) * scales.double().repeat_interleave(group, 1)
    want = x.double() @ w.T + bias.double()
    return pack(codes, bits), scales, zeros, x, bias, want


def _close(got, want, dtype):
    # bf16 keeps 8 significant bits: per-output error up to a few ulps of the output's magnitude
    # (scale and zero offset each rounded to the activation dtype, one rounding of the result)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), (err, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (3, 64), (4, 96), (3, 192)])
def test_group_linear_packed_against_float64(bits, group, dtype):
    q, s, z, x, b, want = _group_case(bits, group, dtype)
    p = prepare_group_linear(q, s, z, bits, group)
    assert set(p) == {"int4pack", "int4pack_sz"}
    assert p["int4pack"].numel() == q.shape[0] * 192 // 2  # 4 bits per weight, W3 included
    got = group_linear_prepared(x, p, bits, group, b)
    assert got.dtype == dtype and got.shape == want.shape
    _close(got, want, dtype)


def test_w3_packed_is_exact_in_codes():
    """W3 maps (q - z) + 8 into [1, 15] with no zero offset: with float32-exact scales the bf16 result
    is the float64 result rounded once or twice, never an offset error."""
    q, s, z, x, b, want = _group_case(3, 64, torch.bfloat16)
    p = prepare_group_linear(q, s, z, 3, 64)
    assert torch.count_nonzero(p["int4pack_sz"][..., 1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32])
def test_float32_keeps_the_reference_layout(dtype):
    q, s, z, x, b, want = _group_case(4, 64, dtype)
    p = prepare_group_linear(q, s, z, 4, 64)
    assert set(p) == {"qweight_kn", "scales_kn", "szeros_kn"}
    torch.testing.assert_close(group_linear_prepared(x, p, 4, 64, b).double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("env", [("OVERDRIVE_KERNELS", "torch"), ("OVERDRIVE_CPU_PACKED", "0"), None])
def test_switches_and_shapes_turn_packing_off(monkeypatch, env):
    if env:
        monkeypatch.setenv(*env)
    q, s, z, x, b, want = _group_case(4, 64, torch.bfloat16, n=48 if env else 40)  # N=40: not a multiple of 16
    p = prepare_group_linear(q, s, z, 4, 64)
    assert "qweight_kn" in p
    _close(group_linear_prepared(x, p, 4, 64, b), want, torch.bfloat16)


def _act8_case(wbits, dtype, m=6, k=256, n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    lim = 127 if wbits == 8 else 7
    codes = torch.randint(-lim, lim + 1, (n, k), generator=g)
    scales = (torch.rand(n, generator=g) / 50 + 1e-3).to(dtype)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    qweight = codes.to(torch.int8) if wbits == 8 else pack(codes + 8, 4)
    # independent float64 reference: per-token symmetric int8, round half away from zero
    xd = x.double()
    sx = xd.abs().amax(-1, keepdim=True) / 127
    xq = (torch.sign(xd / sx) * torch.floor((xd / sx).abs() + 0.5)).clamp(-127, 127)
    want = (xq @ codes.double().T) * sx * scales.double() + bias.double()
    return qweight, scales, x, bias, want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wbits", [8, 4])
def test_act8_packed_against_float64(wbits, dtype):
    qweight, s, x, b, want = _act8_case(wbits, dtype)
    p = prepare_act8_linear(qweight, s, wbits)
    assert ("int8pack" if wbits == 8 else "int4pack") in p
    got = act8_linear_prepared(x, p, wbits, b)
    assert got.dtype == dtype
    _close(got, want, dtype)


def test_act8_float32_unchanged():
    qweight, s, x, b, want = _act8_case(8, torch.float32)
    p = prepare_act8_linear(qweight, s, 8)
    assert set(p) == {"qweight", "scales"}
    torch.testing.assert_close(act8_linear_prepared(x, p, 8, b).double(), want, rtol=1e-5, atol=1e-4)


def test_int4pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        cpu_packed.prepare_int4pack(torch.full((2, 64), 16), torch.ones(2, 2), None, 32, torch.bfloat16)


def test_cpu_features_agree_with_cpuinfo():
    f = cpu_packed.cpu_features()
    flags = cpu_packed._cpuinfo_flags()
    if flags:  # torch and /proc/cpuinfo must not disagree about AVX-512
        assert f.avx512 == ("avx512f" in flags) or f.avx512
    assert f.capability and f.describe()

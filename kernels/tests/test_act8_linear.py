from __future__ import annotations

import pytest
import torch

from overdrive.kernels import act8_linear, act8_linear_reference, pack
from overdrive.kernels.act8_linear import quantize_per_token, round_half_away

from .conftest import needs_cuda

SHAPES = [(1, 70, 33), (5, 128, 64), (17, 200, 65), (3, 8, 5), (16, 96, 130), (33, 64, 17)]


def _inputs(m, k, n, wbits, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    if wbits == 8:
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        codes = q.double()
    else:
        c = torch.randint(1, 16, (n, k), generator=g)  # int4 in [-7, 7] stored as code + 8
        q, codes = pack(c, 4), c.double() - 8
    return x, q, codes, torch.rand(n, generator=g) / 50 + 1e-3, torch.randn(n, generator=g)


def _float64(x, codes, ws, bias, quant_dtype=torch.float64, smooth=None):
    """float64 GEMM of the per-token int8 codes; ``quant_dtype`` is the arithmetic of the scale and the
    division (the Triton kernel quantizes in IEEE fp32: float64 would round rare near-ties differently);
    ``smooth``: per-input-channel divisor of x before quantization."""
    xd = x.to(quant_dtype)
    if smooth is not None:
        xd = xd / smooth.to(quant_dtype)
    sx = xd.abs().amax(-1) / 127
    v = xd / sx[:, None]
    xq = torch.clamp(torch.sign(v) * torch.floor(v.abs() + 0.5), -127, 127).double()
    return (xq @ codes.T) * sx.double()[:, None] * ws.double()[None, :] + bias.double()


def test_per_token_quantization_closed_form():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [-2.0, 1.0, 0.003, 0.999]])
    xq, sx = quantize_per_token(x)
    assert sx.tolist() == pytest.approx([1 / 127, 2 / 127])
    assert xq[0].tolist() == [127, -64, 32, 0]  # -63.5 and 31.75 round away from zero / to nearest
    assert round_half_away(torch.tensor([0.5, -0.5, 1.5, -2.5])).tolist() == [1, -1, 2, -3]


@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_reference_against_float64(wbits, m, k, n):
    x, q, codes, ws, b = _inputs(m, k, n, wbits)
    torch.testing.assert_close(act8_linear_reference(x, q, ws, wbits, b).double(), _float64(x, codes, ws, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_triton_kernel_in_interpreter(interpret, wbits, m, k, n):
    mod = interpret("act8_linear")
    x, q, codes, ws, b = _inputs(m, k, n, wbits, seed=m * k + n)
    out = torch.full((m, n), float("nan"))
    got = mod.act8_linear(x, q, ws, wbits, b, out=out)
    # fp32 vs float64 rounding of x / sx can move a code by one at an exact .5: allow one step
    step = (x.abs().amax(-1, keepdim=True).double() / 127) * ws.double()[None, :] * (127 if wbits == 8 else 7)
    assert ((got.double() - _float64(x, codes, ws, b)).abs() <= step + 1e-4).all()
    torch.testing.assert_close(got.double(), _float64(x, codes, ws, b), rtol=1e-3, atol=1e-3)


def _smooth(k, seed):
    # channel-balancing divisors spanning two orders of magnitude, as SmoothQuant factors do
    return torch.exp(torch.randn(k, generator=torch.Generator().manual_seed(seed)) * 1.5)


@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("m,k,n", SHAPES[:4])
def test_smooth_divides_each_input_channel_before_quantization(wbits, m, k, n):
    x, q, codes, ws, b = _inputs(m, k, n, wbits)
    s = _smooth(k, m + k)
    got = act8_linear_reference(x, q, ws, wbits, b, smooth=s).double()
    torch.testing.assert_close(got, _float64(x, codes, ws, b, smooth=s), rtol=1e-5, atol=1e-5)
    # not the same as quantizing x itself: the divisor changes which channels dominate a token's scale
    assert not torch.allclose(got, _float64(x, codes, ws, b), rtol=1e-3, atol=1e-3)
    # closed form: smooth = 2**j scales the codes' input exactly like x / 2**j does
    p2 = 2.0 ** torch.arange(k).remainder(3)
    torch.testing.assert_close(act8_linear_reference(x, q, ws, wbits, b, smooth=p2),
                               act8_linear_reference(x / p2, q, ws, wbits, b), rtol=0, atol=0)


@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_triton_kernel_with_smooth_in_interpreter(interpret, wbits, m, k, n):
    mod = interpret("act8_linear")
    x, q, codes, ws, b = _inputs(m, k, n, wbits, seed=7 * m + k)
    s = _smooth(k, n)
    got = mod.act8_linear(x, q, ws, wbits, b, smooth=s)
    ref = _float64(x, codes, ws, b, smooth=s)
    xs = x.double() / s.double()
    step = (xs.abs().amax(-1, keepdim=True) / 127) * ws.double()[None, :] * (127 if wbits == 8 else 7)
    assert ((got.double() - ref).abs() <= step + 1e-4).all()  # at most one code step at an fp32 tie
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)
    # the kernel's own fp32 arithmetic (x / s, then / sx), as torch computes it: equal up to accumulation order
    torch.testing.assert_close(got.double(), _float64(x, codes, ws, b, torch.float32, smooth=s), rtol=1e-5, atol=1e-4)


def test_bad_input_names_the_tensor():
    x, q, codes, ws, b = _inputs(2, 16, 4, 8)
    with pytest.raises(ValueError, match=r"qweight has shape \(4, 16\) and dtype torch.int8, expected \(4, 2\)"):
        act8_linear(x, q, ws, 4)
    with pytest.raises(ValueError, match=r"w_scales must be a floating \(4,\)"):
        act8_linear(x, q, ws[:3], 8)
    with pytest.raises(ValueError, match="wbits=3"):
        act8_linear(x, q, ws, 3)
    with pytest.raises(ValueError, match=r"smooth must be a floating \(16,\) tensor"):
        act8_linear(x, q, ws, 8, smooth=torch.ones(15))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (256, 4096, 11008)])
def test_triton_kernel_on_gpu(wbits, m, k, n):
    x, q, codes, ws, b = _inputs(m, k, n, wbits, torch.float16)
    got = act8_linear(x.cuda(), q.cuda(), ws.cuda(), wbits, b.cuda())
    torch.testing.assert_close(got.double().cpu(), _float64(x, codes, ws, b, torch.float32), rtol=2e-2, atol=5e-2)

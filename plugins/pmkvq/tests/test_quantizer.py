"""PM-KVQ's quantizer on the tensors PM-KVQ cares about: round-trip error within each width's bound on
random and outlier-heavy K/V, and the integer-domain b -> b/2 requantization against an independent
float64 quantize(dequantize(.)) at b/2 bits.

The bounds are closed forms of the format (half a step of each token's group), computed here in
float64 from the data, not from the quantizer's own scale output.
"""
from __future__ import annotations

import pytest
import torch

from overdrive.kernels import kv_dequantize, kv_quantize, kv_requantize, unpack

GROUP = 128


def _tensors() -> dict[str, torch.Tensor]:
    """(tokens, D) float64 K/V-like tensors: Gaussian; keys with outlier channels (a few channels 30-60x
    larger, as LLM keys have); heavy-tailed (Student t, 2 degrees of freedom); a few huge single entries."""
    g = torch.Generator().manual_seed(0)
    d = 256
    gauss = torch.randn(64, d, generator=g, dtype=torch.float64)
    chans = gauss.clone()
    idx = torch.randperm(d, generator=g)[:6]
    chans[:, idx] *= torch.linspace(30, 60, 6, dtype=torch.float64)
    t = torch.distributions.StudentT(2.0).sample((64, d)).double()
    spikes = gauss.clone()
    spikes[torch.arange(0, 64, 7), torch.randint(0, d, (10,), generator=g)] = 1e3
    return {"gaussian": gauss, "outlier channels": chans, "student-t": t, "spikes": spikes}


def _step(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per element: the step (max - min) / (2**bits - 1) of its token's group, float64, closed form."""
    g = x.reshape(*x.shape[:-1], -1, GROUP)
    step = (g.amax(-1) - g.amin(-1)) / (2 ** bits - 1)
    return step.repeat_interleave(GROUP, dim=-1)


@pytest.mark.parametrize("name", list(_tensors()))
@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_round_trip_error_within_half_a_step(name, bits):
    x = _tensors()[name]
    p, s, z = kv_quantize(x.float(), bits, GROUP)
    y = kv_dequantize(p, s, z, bits, x.shape[-1], GROUP).double()
    # float32 storage of x, scale and zero adds a few ulps of the group's magnitude
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().reshape(x.shape[0], -1, GROUP).amax(-1).repeat_interleave(GROUP, -1)
    err = (y - x).abs()
    assert (err <= _step(x, bits) / 2 + slack).all(), float((err - _step(x, bits) / 2).max())
    # and the bound is tight: some element's error comes close to half its step
    assert float((err / (_step(x, bits) / 2)).max()) > 0.8


def _independent_qdq_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 min-max quantization of x at ``bits``: (codes, step per element)."""
    g = x.reshape(*x.shape[:-1], -1, GROUP)
    lo = g.amin(-1, keepdim=True)
    step = ((g.amax(-1, keepdim=True) - lo) / (2 ** bits - 1)).clamp_min(1e-300)
    codes = torch.clamp(torch.floor((g - lo) / step + 0.5), 0, 2 ** bits - 1)
    return codes.reshape(x.shape), step.expand_as(g).reshape(x.shape)


@pytest.mark.parametrize("name", list(_tensors()))
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_integer_requantization_equals_quantize_dequantize_within_one_code(name, bits):
    x = _tensors()[name]
    d = x.shape[-1]
    p, s, z = kv_quantize(x.float(), bits, GROUP)
    p2, s2 = kv_requantize(p, s, bits, d)
    half = bits // 2
    got = unpack(p2, half, d).to(torch.int64)
    # independent path: dequantize the b-bit codes (float64), then quantize that at b/2 bits
    deq = (unpack(p, bits, d).double().reshape(x.shape[0], -1, GROUP) * s.double()[..., None]
           + z.double()[..., None]).reshape(x.shape)
    want, step = _independent_qdq_codes(deq, half)
    assert int((got - want.to(torch.int64)).abs().max()) <= 1  # at most one code step apart
    # in fact equal: q / f with f = 2**(b/2) + 1 odd is never a tie, and is at least 1 / (2 f) away from one,
    # far more than the float64 error of the independent path
    assert torch.equal(got, want.to(torch.int64))
    # the new scale is the quantize(dequantize) step: scale * (2**(b/2) + 1) = (max - min) / (2**(b/2) - 1)
    torch.testing.assert_close(s2.double().repeat_interleave(GROUP, -1), step, rtol=1e-6, atol=0)
    # values: the requantized cache is within one new step of quantize(dequantize(.)) at b/2 bits
    y = kv_dequantize(p2, s2, z, half, d, GROUP).double()
    ref = (want * step).reshape(x.shape) + deq.reshape(x.shape[0], -1, GROUP).amin(-1).repeat_interleave(GROUP, -1)
    assert ((y - ref).abs() <= step * (1 + 1e-5)).all()

"""GPTQ against an independent float64 implementation written plainly here, and closed forms."""
from __future__ import annotations

import pytest
import torch

from overdrive.mbq.gptq import ChannelSymmetric, GroupAsymmetric, Hessian, gptq, objective, rtn
from overdrive.mbq.quant import rtn_codes, rtn_per_channel_symmetric
from overdrive.testing.gptq_reference import gptq_reference


def _inputs(t: int, k: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few outlier channels (what makes GPTQ's feedback matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= 6.0
    return x


CASES = [  # (grid, act_order, block_size): groups inside a block, straddling blocks, per channel
    (GroupAsymmetric(4, 32), False, 64),
    (GroupAsymmetric(3, 16), False, 24),
    (GroupAsymmetric(4, 32), True, 64),
    (ChannelSymmetric(4), False, 40),
    (ChannelSymmetric(8), True, 64),
]


@pytest.mark.parametrize("grid,act_order,block", CASES)
def test_codes_equal_the_plain_float64_implementation(grid, act_order, block):
    n, k = 16, 64
    x = _inputs(400, k, seed=1)
    tok_w = torch.rand(400, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.05
    for weights in (None, tok_w):
        hs = Hessian(k, torch.float64)
        for part, pw in zip(x.split(150), (weights.split(150) if weights is not None else [None] * 3)):
            hs.add(part, pw)  # streaming, in uneven batches
        res = gptq(w, hs.get(), grid, block_size=block, percdamp=0.01, act_order=act_order, dtype=torch.float64)
        codes, scales, zeros = gptq_reference(w, x, weights, grid, 0.01, act_order)
        assert torch.equal(res.codes, codes)
        torch.testing.assert_close(res.scales, scales, rtol=1e-12, atol=0)
        assert torch.equal(res.zeros, zeros)
        # the dequantized weight is the codes on the grid
        if grid.group_size:
            deq = (res.codes.reshape(n, -1, grid.group_size) - zeros[..., None]) * scales[..., None]
        else:
            deq = res.codes * scales[:, None]
        torch.testing.assert_close(res.weight, deq.reshape(n, k), rtol=0, atol=1e-15)


def test_float32_math_agrees_with_float64_on_almost_every_code():
    x = _inputs(300, 64, seed=4)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 0.05
    h = Hessian(64)
    h.add(x.float())
    a = gptq(w, h.get(), GroupAsymmetric(4, 32)).codes
    b = gptq_reference(w, x, None, GroupAsymmetric(4, 32), 0.01, False)[0]
    assert (a == b).float().mean() > 0.99


def test_identity_hessian_gives_round_to_nearest():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(6)) * 0.1
    eye = torch.eye(128)
    res = gptq(w, eye, GroupAsymmetric(3, 64, scale_dtype=None))
    codes, scales, zeros = rtn_codes(w, 3, 64)
    assert torch.equal(res.codes, codes.reshape(16, 128))
    assert torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)
    res = gptq(w, eye, ChannelSymmetric(8, scale_dtype=None), act_order=True)
    codes, scales = rtn_per_channel_symmetric(w, 8)
    assert torch.equal(res.codes, codes) and torch.equal(res.scales, scales)


@pytest.mark.parametrize("seed", range(3))
def test_never_worse_than_rtn_on_the_calibration_objective(seed):
    k = 64
    x = _inputs(512, k, seed=10 + seed).float()
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(20 + seed)) * 0.05
    h = Hessian(k)
    h.add(x)
    for grid in (GroupAsymmetric(3, 32), GroupAsymmetric(4, 16), ChannelSymmetric(4)):
        base = objective(w, rtn(w, grid).weight, h.get())
        for act_order in (False, True):
            assert gptq(w, h.get(), grid, act_order=act_order).error <= base


class _Steps:
    """A test grid with one input column per group: the first group rounds to a step of 1, every
    later group to a step of 1e-12 (quantization is then the identity to float64 precision), so
    GPTQ's result is column 0 rounded and the optimal update of the others."""

    group_size = 1

    def __init__(self) -> None:
        self.calls = 0

    def params(self, w):
        self.calls += 1
        s = 1.0 if self.calls == 1 else 1e-12
        return torch.full((w.shape[0],), s, dtype=w.dtype), torch.zeros(w.shape[0], dtype=w.dtype)

    def quantize(self, w, s, z):
        q = torch.round(w / s)
        return q, q * s


def test_token_weights_give_the_weighted_least_squares_update():
    """With column 0 fixed to its rounded value, the other columns become the exact minimiser of the
    token-weighted squared output error sum_t w_t |x_t (W - Q)^T|^2 (float64 normal equations)."""
    t, k, n = 200, 12, 5
    x = _inputs(t, k, seed=30)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(31), dtype=torch.float64) * 0.8 + 0.3
    tok_w = torch.zeros(t, dtype=torch.float64)
    tok_w[:60] = 1.0
    tok_w[60:120] = 7.5  # e.g. vision tokens weighted by MBQ's gradient ratio; the rest weigh 0
    results = {}
    for name, tw in (("uniform", None), ("weighted", tok_w)):
        h = Hessian(k, torch.float64)
        h.add(x, tw)
        res = gptq(w, h.get(), _Steps(), percdamp=0.0, block_size=5, dtype=torch.float64)
        q0 = torch.round(w[:, 0])
        d = torch.ones(t, dtype=torch.float64) if tw is None else tw
        xf, x0 = x[:, 1:], x[:, 0]
        # minimise sum_t d_t (x0_t (w0 - q0) + xf_t (wf - qf))^2 over qf: normal equations
        a = xf.T @ (d[:, None] * xf)
        rhs = xf.T @ (d * x0)
        delta = torch.linalg.solve(a, rhs)  # qf = wf + outer(w0 - q0, delta)
        expect = w[:, 1:] + torch.outer(w[:, 0] - q0, delta)
        assert torch.equal(res.weight[:, 0], q0)
        torch.testing.assert_close(res.weight[:, 1:], expect, rtol=1e-9, atol=1e-9)
        results[name] = res.weight
    assert (results["uniform"] - results["weighted"]).abs().max() > 1e-3  # the weights change the answer


def test_dead_columns_are_rounded_to_nearest_without_feedback():
    k = 64
    x = _inputs(300, k, seed=40).float()
    x[:, 5] = 0.0  # never active in calibration
    h = Hessian(k)
    h.add(x)
    w = torch.randn(8, k, generator=torch.Generator().manual_seed(41)) * 0.05
    grid = GroupAsymmetric(4, 64)
    res = gptq(w, h.get(), grid)
    assert torch.isfinite(res.weight).all()
    # the dead column got no error from earlier columns: column 5 is the nearest code to w[:, 5]
    # under the group's parameters
    q, _ = grid.quantize(w[:, 5], res.scales[:, 0], res.zeros[:, 0])
    assert torch.equal(res.codes[:, 5], q)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq(torch.zeros(4, 64), torch.eye(32), GroupAsymmetric(4, 32))
    with pytest.raises(ValueError, match="not a multiple of group size"):
        gptq(torch.zeros(4, 48), torch.eye(48), GroupAsymmetric(4, 32))
    with pytest.raises(ValueError, match="static groups"):
        gptq(torch.zeros(4, 64), torch.eye(64), GroupAsymmetric(4, 32), act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="token weights"):
        Hessian(4).add(torch.zeros(3, 4), torch.ones(2))

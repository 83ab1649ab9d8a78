"""DiTFastAttn calibration arithmetic: the v2 integer program and the v1 loss against brute force."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from overdrive.ditfastattn.calibrate import choose_heads, v1_loss


def _brute(rse, saving, heads, alpha):
    cut = 1.5 * alpha / heads
    best_gain = 0.0
    names = ["full", *rse]
    for combo in itertools.product(names, repeat=heads):
        if any(c != "full" and (rse[c][h] >= cut or saving[c] <= 0) for h, c in enumerate(combo)):
            continue
        if sum(rse[c][h] for h, c in enumerate(combo) if c != "full") > alpha:
            continue
        gain = sum(saving[c] for c in combo if c != "full")
        if gain > best_gain + 1e-9:
            best_gain = gain
    return best_gain


@pytest.mark.parametrize("seed", range(12))
def test_v2_integer_program_matches_exhaustive_search(seed):
    rng = random.Random(seed)
    heads = rng.choice([2, 3, 4])
    alpha = rng.choice([0.05, 0.2, 0.6])
    cands = ["share", "arrow:8", "arrow:16", "arrow:32"]
    rse = {c: [rng.random() * 0.3 for _ in range(heads)] for c in cands}
    saving = {"share": 100.0, "arrow:8": 60.0, "arrow:16": 75.0, "arrow:32": 85.0}
    codes = choose_heads(rse, saving, heads, alpha)
    assert len(codes) == heads
    spent = sum(rse[c][h] for h, c in enumerate(codes) if c != "full")
    assert spent <= alpha + 1e-9
    assert all(c == "full" or rse[c][h] < 1.5 * alpha / heads for h, c in enumerate(codes))
    gain = sum(saving[c] for c in codes if c != "full")
    assert gain == pytest.approx(_brute(rse, saving, heads, alpha), abs=1e-6)


def test_v1_loss_closed_form():
    a = torch.tensor([[1.0, -2.0, 0.0, 4.0]])
    b = torch.tensor([[1.0, 2.0, 0.0, 2.0]])
    # |a-b| / (max(|a|,|b|) + 1e-6), clipped to [0, 10]: 0, 4/2, 0, 2/4
    expect = (0 + 4 / (2 + 1e-6) + 0 + 2 / (4 + 1e-6)) / 4
    assert v1_loss([a], [b]) == pytest.approx(expect, rel=1e-12)
    # the mean runs over every element of every call of the step (with |.|, the ratio is at most 2)
    c, d = torch.tensor([1e-3]), torch.tensor([-1e-3])
    assert v1_loss([a, c], [b, d]) == pytest.approx((expect * 4 + 2e-3 / (1e-3 + 1e-6)) / 5, rel=1e-9)


def test_psnr_and_ssim_closed_forms():
    from overdrive.metrics import psnr, ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 24, generator=g, dtype=torch.float64)
    assert psnr(x, x) == float("inf") and ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # a constant offset d: MSE = d^2
    assert psnr(x + 0.1, x) == pytest.approx(20.0, abs=1e-9)
    # constant images a and b: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.7, 0.01 ** 2
    got = ssim(torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # x vs a * x (no mean shift, windows see scaled structure): SSIM < 1 and symmetric
    assert ssim(x, 0.5 * x) == pytest.approx(ssim(0.5 * x, x), rel=1e-12) and ssim(x, 0.5 * x) < 0.99

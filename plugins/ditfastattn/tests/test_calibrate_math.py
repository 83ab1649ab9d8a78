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

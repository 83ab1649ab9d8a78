"""MxMoE's allocation program against brute force on small instances."""
import itertools
import math

import numpy as np
import pytest

from overdrive.config import ConfigError
from overdrive.mxmoe.allocate import allocate, objective, pareto, solve_linear


def _instance(seed, n=4, c=3):
    rng = np.random.default_rng(seed)
    bits = np.tile(np.sort(rng.choice([2.2, 3.2, 4.2, 8.1, 4.1], size=c, replace=False)), (n, 1))
    loss = rng.uniform(0.1, 1.0, (n, c)) * (2.0 ** -bits)  # more bits, less loss
    time = rng.uniform(0.5, 2.0, (n, c))
    weights = rng.integers(1, 5, n).astype(float)
    return loss, time, bits, weights


def _brute(cost_fn, bits, weights, budget):
    n, c = bits.shape
    best, arg = math.inf, None
    for choice in itertools.product(range(c), repeat=n):
        if sum(bits[i, k] * weights[i] for i, k in enumerate(choice)) > budget + 1e-9:
            continue
        v = cost_fn(choice)
        if v < best - 1e-12:
            best, arg = v, list(choice)
    return best, arg


@pytest.mark.parametrize("seed", range(12))
def test_solve_linear_matches_brute_force(seed):
    loss, time, bits, weights = _instance(seed)
    cost = loss + 0.1 * time
    for frac in (0.2, 0.5, 0.9):
        lo, hi = (bits.min(1) * weights).sum(), (bits.max(1) * weights).sum()
        budget = lo + frac * (hi - lo)
        got = solve_linear(cost, bits, weights, budget)
        best, _ = _brute(lambda ch: sum(cost[i, k] for i, k in enumerate(ch)), bits, weights, budget)
        assert sum(cost[i, k] for i, k in enumerate(got)) == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert sum(bits[i, k] * weights[i] for i, k in enumerate(got)) <= budget + 1e-9


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("r", [0.0, 1.0])
def test_allocate_exact_at_the_ends(seed, r):
    # at r = 0 or 1 the log objective is monotone in one sum: the linear program is exact
    loss, time, bits, weights = _instance(seed, n=5)
    lo, hi = (bits.min(1) * weights).sum(), (bits.max(1) * weights).sum()
    avg = (lo + 0.5 * (hi - lo)) / weights.sum()
    a = allocate(loss, time, bits, weights, avg, r)
    best, _ = _brute(lambda ch: objective(ch, loss, time, r), bits, weights, avg * weights.sum())
    assert objective(a.choice, loss, time, r) == pytest.approx(best, rel=1e-9)
    assert a.avg_bits <= avg + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_allocate_mid_r_close_to_brute_force(seed):
    loss, time, bits, weights = _instance(seed, n=5)
    lo, hi = (bits.min(1) * weights).sum(), (bits.max(1) * weights).sum()
    avg = (lo + 0.6 * (hi - lo)) / weights.sum()
    a = allocate(loss, time, bits, weights, avg, 0.5)
    best, _ = _brute(lambda ch: objective(ch, loss, time, 0.5), bits, weights, avg * weights.sum())
    # successive linearisation: a feasible allocation within a small margin of the optimum
    assert objective(a.choice, loss, time, 0.5) <= best + 0.05


def test_budget_below_every_choice_is_rejected():
    loss, time, bits, weights = _instance(0)
    with pytest.raises(ConfigError, match="below the smallest candidate"):
        allocate(loss, time, bits, weights, float(bits.min()) - 0.5, 1.0)


def test_pareto_set_is_nondominated_and_spans_r():
    loss, time, bits, weights = _instance(3, n=6, c=4)
    avg = float((bits.min(1) + bits.max(1)).mean() / 2)
    front = pareto(loss, time, bits, weights, avg)
    assert front
    for a in front:
        assert not any(b.loss < a.loss and b.time < a.time for b in front)
    assert min(a.loss for a in front) == pytest.approx(
        allocate(loss, time, bits, weights, avg, 1.0).loss)

"""MxMoE's per-layer bit allocation as an integer program (a leaf: numpy and scipy only).

One MoE layer has blocks ``i`` (expert x linear), each with ``w_i`` weights, and candidate formats
``c``; choosing ``c`` for ``i`` costs ``loss[i, c]`` (the layer's output error when only block ``i``
is quantized that way), ``time[i, c]`` (the block's matmul time at its expert's token count) and
``bits[i, c] * w_i`` storage bits. MxMoE minimises

    r * log(sum_i loss[i, c_i]) + (1 - r) * log(sum_i time[i, c_i])
    subject to  sum_i bits[i, c_i] * w_i <= avg_bits * sum_i w_i

The logs make the trade-off scale-free. Each log is linearised at a reference allocation
(``log L ~ log L0 + (L - L0) / L0``), which leaves the 0/1 program

    min sum_{i,c} x[i,c] * (r * loss[i,c] / L0 + (1 - r) * time[i,c] / T0)
    s.t. sum_c x[i,c] = 1 for every i,  sum_{i,c} x[i,c] * bits[i,c] * w_i <= budget

solved exactly by :func:`solve_linear` (scipy.optimize.milp, HiGHS); :func:`allocate` repeats it,
re-linearising at the last solution, until the allocation stops changing (at ``r`` = 0 or 1 the
first solve is already exact: one log is monotone in one sum). :func:`pareto` sweeps ``r`` and keeps
the allocations no other one beats in both loss and time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from overdrive.config import ConfigError


def solve_linear(cost: np.ndarray, bits: np.ndarray, weights: np.ndarray, budget: float) -> list[int]:
    """The choice per block minimising ``sum cost[i, c_i]`` with ``sum bits[i, c_i] * weights[i] <= budget``.

    ``cost``, ``bits``: (blocks, choices); ``weights``: (blocks,). ConfigError when no choice fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    cost, bits, weights = np.asarray(cost, float), np.asarray(bits, float), np.asarray(weights, float)
    n, c = cost.shape
    if bits.shape != (n, c) or weights.shape != (n,):
        raise ValueError(f"cost {cost.shape}, bits {bits.shape}, weights {weights.shape} do not agree")
    smallest = float((bits.min(axis=1) * weights).sum())
    if smallest > budget * (1 + 1e-12):
        raise ConfigError(f"bit budget {budget / weights.sum():.4f} bits per weight is below the smallest candidate "
                          f"allocation ({smallest / weights.sum():.4f}); allow lower-bit formats or raise --avg-bits")
    one_hot = np.zeros((n, n * c))
    for i in range(n):
        one_hot[i, i * c:(i + 1) * c] = 1.0
    storage = (bits * weights[:, None]).reshape(1, -1)
    # scale the budget row to O(1) so HiGHS's feasibility tolerance is relative
    scale = 1.0 / max(budget, 1.0)
    res = milp(cost.reshape(-1), integrality=np.ones(n * c), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_hot, 1, 1),
                            LinearConstraint(storage * scale, -np.inf, budget * scale * (1 + 1e-12))])
    if res.status != 0 or res.x is None:
        raise ConfigError(f"bit allocation failed: {res.message}")
    x = res.x.reshape(n, c)
    return [int(np.argmax(x[i])) for i in range(n)]


@dataclasses.dataclass
class Allocation:
    choice: list[int]
    loss: float
    time: float
    avg_bits: float
    r: float


def _totals(choice: Sequence[int], loss: np.ndarray, time: np.ndarray, bits: np.ndarray, weights: np.ndarray
            ) -> tuple[float, float, float]:
    idx = np.arange(len(choice)), np.asarray(choice)
    return (float(loss[idx].sum()), float(time[idx].sum()),
            float((bits[idx] * weights).sum() / weights.sum()))


def objective(choice: Sequence[int], loss: np.ndarray, time: np.ndarray, r: float, eps: float = 1e-30) -> float:
    """``r log(sum loss) + (1 - r) log(sum time)`` of an allocation."""
    idx = np.arange(len(choice)), np.asarray(choice)
    return r * math.log(float(loss[idx].sum()) + eps) + (1 - r) * math.log(float(time[idx].sum()) + eps)


def allocate(loss: np.ndarray, time: np.ndarray, bits: np.ndarray, weights: np.ndarray, avg_bits: float,
             r: float, max_iters: int = 5) -> Allocation:
    """The allocation of one layer at trade-off ``r`` under ``avg_bits`` (see the module docstring)."""
    if not 0.0 <= r <= 1.0:
        raise ConfigError(f"r must be in [0, 1], got {r}")
    loss, time = np.asarray(loss, float), np.asarray(time, float)
    bits, weights = np.asarray(bits, float), np.asarray(weights, float)
    budget = avg_bits * float(weights.sum())
    tiny = 1e-30
    # first reference: every block at its mean over the choices
    l0, t0 = max(float(loss.mean(axis=1).sum()), tiny), max(float(time.mean(axis=1).sum()), tiny)
    choice: list[int] | None = None
    for _ in range(max_iters):
        new = solve_linear(r * loss / l0 + (1 - r) * time / t0, bits, weights, budget)
        if new == choice:
            break
        if choice is not None and objective(new, loss, time, r) >= objective(choice, loss, time, r):
            break
        choice = new
        l0 = max(float(loss[np.arange(len(choice)), choice].sum()), tiny)
        t0 = max(float(time[np.arange(len(choice)), choice].sum()), tiny)
    assert choice is not None
    return Allocation(choice, *_totals(choice, loss, time, bits, weights), r)


def pareto(loss: np.ndarray, time: np.ndarray, bits: np.ndarray, weights: np.ndarray, avg_bits: float,
           rs: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)) -> list[Allocation]:
    """Allocations over the ``rs`` sweep that no other one beats in both loss and time (by r)."""
    found = [allocate(loss, time, bits, weights, avg_bits, r) for r in rs]
    keep = []
    for a in found:
        dominated = any((b.loss <= a.loss and b.time <= a.time) and (b.loss < a.loss or b.time < a.time)
                        for b in found)
        if not dominated and not any(k.choice == a.choice for k in keep):
            keep.append(a)
    return keep

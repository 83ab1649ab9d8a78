"""GPTQ from its definition, in float64, for tests: an implementation independent of
:mod:`overdrive.mbq.gptq` (no Cholesky factor, no lazy batches, the inverse of the remaining columns'
Hessian computed afresh at every step). Only the quantization grid (its scales and rounding) is shared."""
from __future__ import annotations

import torch


def gptq_reference(w: torch.Tensor, x: torch.Tensor, tok_w: torch.Tensor | None, grid, percdamp: float,
                   act_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ from its definition, float64, one column at a time: quantize column j, then move the
    not-yet-quantized columns F by the optimal (Optimal Brain Surgeon) update
    ``-(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_j,:`` with ``H_F^-1`` the inverse of the Hessian restricted to
    F, inverted afresh at every step (no Cholesky, no lazy batches)."""
    w = w.double().clone()
    x = x.double()
    d = torch.ones(x.shape[0], dtype=torch.float64) if tok_w is None else tok_w.double()
    h = 2 * (x * d[:, None]).T @ x / d.sum()
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    n, k = w.shape
    order = sorted(range(k), key=lambda c: -float(h[c, c])) if act_order else list(range(k))
    g = grid.group_size
    ng = k // g if g else 1
    scales, zeros = torch.zeros(n, ng, dtype=torch.float64), torch.zeros(n, ng, dtype=torch.float64)
    if g is None:
        scales[:, 0], zeros[:, 0] = grid.params(w)
    elif act_order:
        for j in range(ng):
            scales[:, j], zeros[:, j] = grid.params(w[:, j * g:(j + 1) * g])
    codes = torch.zeros(n, k, dtype=torch.float64)
    remaining = list(order)
    for c in order:
        if g is not None and not act_order and c % g == 0:
            scales[:, c // g], zeros[:, c // g] = grid.params(w[:, c:c + g])
        j = c // g if g else 0
        q, dq = grid.quantize(w[:, c], scales[:, j], zeros[:, j])
        codes[:, c] = q
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        pos = remaining.index(c)
        upd = -torch.outer((w[:, c] - dq) / hinv[pos, pos], hinv[pos])
        w[:, remaining] += upd
        w[:, c] = dq
        remaining.remove(c)
    if g is None:
        return codes, scales[:, 0], zeros[:, 0]
    return codes, scales, zeros

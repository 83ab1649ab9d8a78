"""MoA's math (a leaf: torch, scipy and the plan format only): the candidate grid and densities, the
influence of masking each attention entry, candidate losses, the milp selection and the uniform references.

The pipeline that drives a model through these is :mod:`.calibrate` (its docstring explains the formulas).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import HeadSpans, ModelIdentity

from .config import CalibOptions, MoAPlan, uniform_plan

ALPHA_MULTIPLES = (-2, -1, 0, 1, 2, 4, 8)


def candidates(opts: CalibOptions) -> list[tuple[float, float]]:
    """(alpha, beta) pairs: the alpha grid times the beta grid."""
    betas = [i / (opts.betas - 1) for i in range(opts.betas)]
    return [(float(m * opts.alpha_step), b) for m in ALPHA_MULTIPLES for b in betas]


def candidate_density(cands: Sequence[tuple[float, float]], length: int, opts: CalibOptions) -> torch.Tensor:
    """(C,) density of each candidate at ``length`` (per-query rule, float64)."""
    spans = HeadSpans(tuple(a for a, _ in cands), tuple(b for _, b in cands), opts.min_span)
    return torch.tensor(spans.density(length, opts.sink), dtype=torch.float64)


def influence_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                     scale: float, budget: int = 1 << 24) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (first query, end, I) with I (Hk, chunk, N): the masking influence summed over the batch and over
    the query heads of each KV group. q (B, Hq, N, D), k/v (B, Hk, N, D), out/dout (B, N, Hq, D)."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    o, do = out.detach().to(ct).transpose(1, 2), dout.to(ct).transpose(1, 2)  # (B, Hq, N, D)
    kk, vv = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    step = max(1, budget // max(1, b * hq * n))
    keys = torch.arange(n, device=q.device)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        causal = keys[None, :] <= torch.arange(c0, c1, device=q.device)[:, None]  # (c, N)
        s = (q[:, :, c0:c1] @ kk.transpose(-1, -2)) * scale
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        g = do[:, :, c0:c1] @ vv.transpose(-1, -2)  # dL/dA
        dot = (do[:, :, c0:c1] * o[:, :, c0:c1]).sum(-1, keepdim=True)  # sum_k A_ik g_ik
        infl = -a * (g - dot) / (1.0 - a).clamp_min(1e-6)
        infl = infl.masked_fill(~causal, 0.0)
        yield c0, c1, infl.view(b, hk, hq // hk, c1 - c0, n).sum(dim=(0, 2))


def candidate_losses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                     scale: float, spans: HeadSpans, sink: int) -> torch.Tensor:
    """(Hk, C): for each KV head and candidate (the C "heads" of ``spans``), the summed influence of the entries
    the candidate drops: query i drops keys [sink, start_c(i + 1))."""
    n = q.shape[2]
    total = torch.zeros(k.shape[1], spans.num_heads, dtype=torch.float64, device=q.device)
    for c0, c1, infl in influence_chunks(q, k, v, out, dout, scale):
        pref = torch.nn.functional.pad(infl.double().cumsum(-1), (1, 0))  # (Hk, c, N + 1): sum of keys < x
        qlen = torch.arange(c0 + 1, c1 + 1, device=q.device)
        st = spans.starts(qlen, sink).clamp(max=n)  # (c, C)
        lo = torch.clamp(qlen, max=sink)[:, None].expand_as(st)
        hi = torch.maximum(st, lo)
        idx_hi = hi.t()[None].expand(pref.shape[0], -1, -1).transpose(1, 2)  # (Hk, c, C)
        idx_lo = lo.t()[None].expand(pref.shape[0], -1, -1).transpose(1, 2)
        total += (pref.gather(2, idx_hi) - pref.gather(2, idx_lo)).sum(1)
    return total


# ------------------------------------------------------------------------------------ selection
def select(losses: Sequence[torch.Tensor], densities: Sequence[torch.Tensor], budget: float,
           weights: Sequence[float]) -> list[list[int]]:
    """One candidate per (layer, KV head) minimising ``sum_n weights[n] * losses[n]`` (each ``(L, Hk, C)``) with the
    mean density at every ``densities[n]`` (``(C,)``, lengths with a constraint) at most ``budget``
    (``scipy.optimize.milp``). Returns the chosen candidate index per layer and KV head."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, heads, cands = losses[0].shape if losses else (0, 0, densities[0].numel())
    units = layers * heads
    lowest = [float(d.min()) for d in densities]
    if any(x > budget + 1e-12 for x in lowest):
        i = max(range(len(lowest)), key=lambda j: lowest[j])
        raise ConfigError(f"--density {budget} cannot be met: the sparsest candidate reads {lowest[i]:.3f} of the "
                          "attention entries at one of the constrained lengths; use longer --lengths / --max-len or a "
                          "smaller --min-span / --sink")
    c = np.zeros(units * cands)
    for w, loss in zip(weights, losses):
        c += w * loss.reshape(-1).double().numpy()
    eq = np.zeros((units, units * cands))
    for u in range(units):
        eq[u, u * cands:(u + 1) * cands] = 1.0
    dens = np.stack([np.tile(d.double().numpy(), units) / units for d in densities])
    res = milp(c, integrality=np.ones(units * cands), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(eq, 1, 1), LinearConstraint(dens, -np.inf, budget)])
    if not res.success:
        raise ConfigError(f"MoA selection failed: {res.message}")
    x = res.x.reshape(layers, heads, cands)
    return [[int(x[i, h].argmax()) for h in range(heads)] for i in range(layers)]


def uniform_references(ident: ModelIdentity, opts: CalibOptions, lengths: Sequence[int]) -> dict[str, MoAPlan]:
    """The widest plans giving every head the same span whose mean density is within ``opts.density`` at
    every length in ``lengths`` (the budget the milp meets): a fixed window (StreamingLLM: ``alpha = W``,
    ``beta = 0``) and an elastic span (``alpha = 0``, ``beta``); a reference no span fits is left out."""
    def fits(p: MoAPlan) -> bool:
        return all(p.density_at(n) <= opts.density + 1e-9 for n in lengths)

    def make(name: str, x: float) -> MoAPlan:
        a, b = (x, 0.0) if name == "streamingllm" else (0.0, x)
        return uniform_plan(ident, a, b, sink=opts.sink, min_span=opts.min_span)

    out = {}
    for name, lo, hi in (("streamingllm", 0.0, float(max(lengths))), ("uniform-elastic", 0.0, 1.0)):
        if not fits(make(name, lo)):
            continue
        for _ in range(40):  # density grows with the window / beta: bisect for the widest that fits
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(make(name, mid)) else (lo, mid)
        if name == "streamingllm":  # spans are ceil(alpha + beta N): the bisection ends just below an integer
            lo = float(int(lo + 1e-6)) if fits(make(name, float(int(lo + 1e-6)))) else float(int(lo))
        out[name] = make(name, lo)
    return out

"""PCDVQ's two codebooks (leaf math: torch, numpy and scipy only).

**Directions** (:func:`direction_codebook`): unit vectors in R^8 taken from the E8 lattice,
E8 = D8 ∪ (D8 + ½·1) with an even coordinate sum. Points are enumerated shell by shell (squared norms
2, 4, 6, ...: 240, 2160, 6720, 17520, 30240, 60480 points), normalised, and a direction already given
by a smaller shell (a point that is a positive multiple of another) is dropped. Shells are added until
there are at least ``2**k`` distinct directions (k = 14: shells 2–8, 26 400 directions; k = 16: shells
2–12, 114 960).

Distribution-aligned selection (the paper's rule, made deterministic): after a random Hadamard
transform the 8-dim weight vectors are close to isotropic Gaussian, so their directions are uniform on
the sphere and a codeword's *usage* (how often it is the nearest direction by cosine) is the area of
its spherical Voronoi cell. We keep the ``2**k`` most used candidates. Usage is estimated with seeded
Gaussian samples (float64), and pooled over orbits of W(D8) — coordinate permutations and sign changes
of an even number of coordinates — which map E8 onto itself and preserve the Gaussian, so every
codeword of an orbit has the same expected usage. Pooling gives low-variance estimates from few
samples and keeps the codebook symmetric: whole orbits are taken in order of decreasing usage per
codeword (ties: smaller shell first, then the orbit's key), and only the last orbit is cut: its usage
is recounted among the codewords already chosen plus its members, and its least used members are
dropped in a few rounds (a cut in coordinate order would leave a lopsided, clustered remainder, which
measured no better than a random codebook at k = 10). The result depends only on
``(k, samples, seed)``; :func:`codebook_digest` fingerprints it so a runtime that rebuilds it can check
it against the digest a checkpoint records.

**Magnitudes** (:func:`lloyd_max_chi`): the norm of an isotropic Gaussian 8-vector with unit variance
per coordinate is χ-distributed with 8 degrees of freedom. The Lloyd–Max quantizer of that density
(levels = conditional means of their cells, boundaries = midpoints of adjacent levels) is found by the
fixed-point iteration, with cell means in closed form: ``r f_k(r) = mu_k f_{k+1}(r)``,
``mu_k = sqrt(2) Γ((k+1)/2) / Γ(k/2)``.
"""
from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch

DIM = 8


def e8_points(max_sq_norm: int) -> np.ndarray:
    """All E8 points with squared norm in (0, max_sq_norm], as *doubled* integer coordinates (int64
    (P, 8), z = 2x), sorted by squared norm then lexicographically."""
    r = int(math.isqrt(4 * max_sq_norm))  # |z_i| <= 2*sqrt(max)
    rows = []
    for parity in (0, 1):  # 0: integer points (even z), 1: half-integer points (odd z)
        vals = np.array([v for v in range(-r, r + 1) if v % 2 == parity], dtype=np.int16)
        grid = np.stack(np.meshgrid(*([vals] * DIM), indexing="ij"), -1).reshape(-1, DIM)
        sq = (grid.astype(np.int32) ** 2).sum(1)
        keep = (sq > 0) & (sq <= 4 * max_sq_norm)
        keep &= (grid.sum(1, dtype=np.int32) % 4 == 0)  # x has an even coordinate sum: sum(z)/2 even
        rows.append(grid[keep].astype(np.int64))
    z = np.concatenate(rows)
    sq = (z * z).sum(1)
    order = np.lexsort(tuple(z[:, i] for i in reversed(range(DIM))) + (sq,))
    return z[order]


def _primitive(z: np.ndarray) -> np.ndarray:
    g = np.gcd.reduce(np.abs(z), axis=1)
    return z // g[:, None]


def e8_directions(min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct E8 directions over enough shells for ``min_count`` of them: (doubled integer points of
    the smallest norm giving each direction (P, 8), their squared norms (P,)), in shell order."""
    sq_max = 2
    while True:
        z = e8_points(sq_max)
        prim = _primitive(z)
        _, first = np.unique(prim, axis=0, return_index=True)
        first.sort()
        if len(first) >= min_count:
            z = z[first]
            sq = (z * z).sum(1) // 4
            return z, sq
        sq_max += 2


def _orbit_keys(z: np.ndarray) -> np.ndarray:
    """A W(D8)-orbit key per point: its sorted |coordinates|, and the parity of its negative
    coordinates when none is zero (even sign changes cannot alter it then)."""
    a = np.sort(np.abs(z), axis=1)
    nonzero = (z != 0).all(1)
    par = np.where(nonzero, (z < 0).sum(1) % 2, 0)
    return np.concatenate([a, par[:, None]], axis=1)


def _nearest(x: torch.Tensor, cb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.long)
    for i in range(0, x.shape[0], chunk):
        out[i:i + chunk] = (x[i:i + chunk] @ cb.T).argmax(1)
    return out


@functools.lru_cache(maxsize=8)
def direction_codebook(k: int, samples: int = 1 << 15, seed: int = 0) -> torch.Tensor:
    """(2**k, 8) float32 unit directions (see the module doc). Cached per process."""
    if not 1 <= k <= 16:
        raise ValueError(f"direction_codebook: k must be in 1..16, got {k}")
    n = 1 << k
    z, sq = e8_directions(n)
    cand = torch.from_numpy(z).double()
    cand = cand / cand.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, DIM, generator=g, dtype=torch.float64)
    counts = torch.bincount(_nearest(x, cand), minlength=len(cand)).numpy()
    keys = _orbit_keys(z)
    _, orbit = np.unique(keys, axis=0, return_inverse=True)
    orbit = orbit.reshape(-1)
    n_orbits = orbit.max() + 1
    size = np.bincount(orbit, minlength=n_orbits)
    usage = np.bincount(orbit, weights=counts, minlength=n_orbits) / size
    shell = np.zeros(n_orbits, dtype=np.int64)
    shell[orbit] = sq
    okey = np.zeros((n_orbits, keys.shape[1]), dtype=np.int64)
    okey[orbit] = keys
    # decreasing usage, then smaller shell, then the orbit key (lexicographic)
    rank = np.lexsort(tuple(okey[:, i] for i in reversed(range(okey.shape[1]))) + (shell, -usage))
    chosen: list[int] = []
    for o in rank:
        members = np.nonzero(orbit == o)[0]
        if len(chosen) + len(members) > n:
            members = _cut_orbit(cand, np.array(chosen, dtype=np.int64), members, n - len(chosen), x)
        chosen.extend(members.tolist())
        if len(chosen) == n:
            break
    return cand[np.sort(np.array(chosen))].float().contiguous()


def _cut_orbit(cand: torch.Tensor, chosen: np.ndarray, members: np.ndarray, need: int, x: torch.Tensor,
               rounds: int = 4) -> np.ndarray:
    """Keep ``need`` of an orbit's ``members``: the same usage rule, recounted among the codewords
    already chosen plus the remaining members, dropping the least used members in a few rounds
    (ties: the later index goes), so members crowded by chosen codewords go first."""
    members = np.sort(members)
    for r in range(rounds, 0, -1):
        excess = len(members) - need
        if excess <= 0:
            break
        drop = excess if r == 1 else max(1, excess // r)
        ids = np.concatenate([chosen, members])
        counts = torch.bincount(_nearest(x, cand[ids]), minlength=len(ids)).numpy()[len(chosen):]
        order = np.lexsort((-members, counts))  # least used first; among equals the later index first
        members = np.sort(np.delete(members, order[:drop]))
    return members


def codebook_digest(cb: torch.Tensor) -> str:
    """Short fingerprint (sha256 of the float32 bytes, rounded to 6 decimals to be robust to the last
    ulp of a platform's arithmetic)."""
    q = torch.round(cb.double() * 1e6).to(torch.int64).numpy().tobytes()
    return hashlib.sha256(q).hexdigest()[:16]


def chi_mean_factor(dof: int) -> float:
    """mu_k = E[R] for R ~ χ(k): ``r f_k(r) = mu_k f_{k+1}(r)``."""
    return math.sqrt(2.0) * math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2))


@functools.lru_cache(maxsize=16)
def lloyd_max_chi(bits: int, dof: int = DIM, iters: int = 2000, tol: float = 1e-13) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd–Max levels (2**bits,) and inner boundaries (2**bits - 1,) for χ(dof), float64."""
    from scipy.stats import chi

    n = 1 << bits
    f, f1 = chi(dof), chi(dof + 1)
    mu = chi_mean_factor(dof)
    levels = f.ppf((np.arange(n) + 0.5) / n)
    for _ in range(iters):
        b = (levels[1:] + levels[:-1]) / 2
        edges = np.concatenate([[0.0], b, [np.inf]])
        p = np.diff(f.cdf(edges))
        m1 = mu * np.diff(f1.cdf(edges))
        new = m1 / p
        done = np.max(np.abs(new - levels)) < tol
        levels = new
        if done:
            break
    return levels, (levels[1:] + levels[:-1]) / 2


def kmeans_directions(x: torch.Tensor, n: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means of unit vectors ``x`` into ``n`` centroids (a baseline for tests/benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:n]].clone()
    for _ in range(iters):
        a = _nearest(x, c)
        s = torch.zeros_like(c).index_add_(0, a, x)
        norm = s.norm(dim=1, keepdim=True)
        c = torch.where(norm > 0, s / norm.clamp_min(1e-30), c)
    return c


__all__ = ["direction_codebook", "codebook_digest", "e8_points", "e8_directions", "lloyd_max_chi",
           "chi_mean_factor", "kmeans_directions", "DIM"]

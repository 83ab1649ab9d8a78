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


#: float32 scores of unit vectors are within this of their float64 values (8 products of unit
#: vectors, plus the rounding of both to float32: a few 1e-7); pairs closer than this are re-checked
TIE_MARGIN = 1e-5
#: float64 closed-form orbit scores closer than this (or sorted |x| coordinates closer than
#: :data:`COORD_GAP`) are re-checked against the whole codebook in float64
ORBIT_MARGIN = 1e-10
COORD_GAP = 1e-7


def _nearest_dense(v64: torch.Tensor, cb64: torch.Tensor, dev: torch.device, budget: int) -> torch.Tensor:
    """float32 scores of the normalised rows against every codeword, top two, float64 re-check of the
    rows whose top two are within TIE_MARGIN (the exact float64 argmax, first index among exact ties)."""
    out = torch.empty(v64.shape[0], dtype=torch.long)
    cb32 = cb64.to(device=dev, dtype=torch.float32)
    chunk = max(256, budget // max(1, cb64.shape[0]))
    for i in range(0, v64.shape[0], chunk):
        x = v64[i:i + chunk]
        xn = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(device=dev, dtype=torch.float32)
        top = (xn @ cb32.T).topk(min(2, cb64.shape[0]), dim=1)
        idx = top.indices[:, 0].cpu()
        if cb64.shape[0] > 1:
            close = ((top.values[:, 0] - top.values[:, 1]) <= TIE_MARGIN).cpu().nonzero().reshape(-1)
            if close.numel():
                idx[close] = (x[close] @ cb64.T).argmax(1)
        out[i:i + chunk] = idx
    return out


class _Orbits:
    """The W(D8)-orbit structure of a codebook (coordinate permutations and even sign changes: the
    symmetries of E8 and of the isotropic Gaussian). For a *complete* orbit (every member in the
    codebook) the largest ``<x, c>`` over its members has a closed form: pair the sorted ``|x|`` with the
    orbit's sorted ``|c|`` and take x's signs (rearrangement inequality); when the orbit has no zero
    coordinate its members have a fixed parity of negative signs, and if x's differs the sign of the
    smallest product is flipped (``- 2 |x|_min |c|_min``). Codewords of incomplete orbits (a cut orbit,
    or any codebook without the symmetry) are scored densely."""

    def __init__(self, cb64: torch.Tensor):
        c = cb64.cpu()
        a = c.abs().sort(dim=1, descending=True).values
        nonzero = (c != 0).all(1)
        par = torch.where(nonzero, (c < 0).sum(1) % 2, torch.zeros_like(nonzero, dtype=torch.long))
        keys = torch.cat([a, par[:, None].double()], 1)
        uniq, orbit = torch.unique(keys, dim=0, return_inverse=True)
        reps = uniq[:, :DIM].contiguous()
        size = torch.bincount(orbit, minlength=len(uniq))
        expected = []
        dv = torch.zeros(len(uniq), DIM, dtype=torch.long)
        for o in range(len(uniq)):
            vals, counts = torch.unique_consecutive(reps[o], return_counts=True)
            perms = math.factorial(DIM) // math.prod(math.factorial(int(m)) for m in counts)
            nz = int((reps[o] != 0).sum())
            expected.append(perms * (2 ** nz if nz < DIM else 2 ** (DIM - 1)))
            dv[o] = torch.repeat_interleave(torch.arange(len(vals)), counts)
        self.reps, self.parity = reps, uniq[:, DIM].long()
        self.constrained = reps[:, DIM - 1] > 0
        self.complete = size == torch.tensor(expected)
        self.dv = dv
        # per codeword: (orbit, digits) with digit i = 2 * (index of |c_i| among its orbit's distinct
        # values, largest first) + (c_i < 0), as orbit * 16^8 + sum digit_i 16^i
        rank = torch.zeros_like(c, dtype=torch.long)
        for o in range(len(uniq)):
            m = orbit == o
            vals = torch.unique_consecutive(reps[o])
            rank[m] = (c[m].abs()[..., None] == vals).long().argmax(-1)
        digit = rank * 2 + (c < 0).long()
        self.key = orbit * (16 ** DIM) + (digit * (16 ** torch.arange(DIM))).sum(1)
        self.key_sorted, self.key_order = self.key.sort()
        self.incomplete_ids = torch.nonzero(~self.complete[orbit]).reshape(-1)

    def lookup(self, key: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.key_sorted, key).clamp_max(len(self.key_sorted) - 1)
        if not bool((self.key_sorted[pos] == key).all()):  # cannot happen for a complete orbit
            raise AssertionError("PCDVQ nearest: a closed-form codeword is not in its complete orbit")
        return self.key_order[pos]


@functools.lru_cache(maxsize=4)
def _orbits_of(cb_bytes: bytes, shape: tuple[int, int]) -> _Orbits:
    return _Orbits(torch.frombuffer(bytearray(cb_bytes), dtype=torch.float64).reshape(shape))


def nearest(v: torch.Tensor, cb: torch.Tensor, device: str | torch.device | None = None,
            budget: int = 1 << 24) -> torch.Tensor:
    """Index of the largest ``<v, c>`` for each row of ``v`` (V, 8) over ``cb`` (C, 8, unit rows): exactly
    the float64 ``argmax(v @ cb.T)`` (first index among exact ties), computed fast.

    Codewords in complete W(D8) orbits (all of an E8 codebook but its cut orbit) are scored in closed
    form, per orbit (:class:`_Orbits`, float64): O(orbits) work per vector instead of O(C). The others
    are scored only for rows whose closed-form bound over their full orbit can win, by a float32 matmul
    of normalised vectors with top two and a float64 re-check of near-ties. Rows with a near-tie anywhere
    (two orbit scores within :data:`ORBIT_MARGIN`, two |x| coordinates within :data:`COORD_GAP`) are
    re-scored in float64 against the whole codebook. ``device``: where the scores are computed (default:
    ``v``'s); ``budget``: scores held per chunk."""
    dev = torch.device(device) if device is not None else v.device
    v64 = v.detach().to("cpu", torch.float64)
    cb64 = cb.detach().to("cpu", torch.float64).contiguous()
    n, c = v64.shape[0], cb64.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    orb = _orbits_of(cb64.numpy().tobytes(), tuple(cb64.shape))
    if not bool(orb.complete.any()):
        return _nearest_dense(v64, cb64, dev, budget)
    out = torch.empty(n, dtype=torch.long)
    comp = torch.nonzero(orb.complete).reshape(-1)
    reps, bmin = orb.reps[comp].to(dev), orb.reps[comp, DIM - 1].to(dev)
    cons, par, dv = orb.constrained[comp].to(dev), orb.parity[comp].to(dev), orb.dv[comp].to(dev)
    inc = ~orb.complete
    inc_reps = orb.reps[inc].to(dev)
    inc_cons, inc_par, inc_bmin = orb.constrained[inc].to(dev), orb.parity[inc].to(dev), orb.reps[inc, DIM - 1].to(dev)
    inc_ids = orb.incomplete_ids
    pow16 = (16 ** torch.arange(DIM, device=dev))
    chunk = max(1024, budget // (4 * DIM))
    for i in range(0, n, chunk):
        x = v64[i:i + chunk].to(dev)
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
        a, order = xn.abs().sort(dim=1, descending=True)
        px = (xn < 0).sum(1) % 2
        amin = a[:, DIM - 1:]
        score = a @ reps.T - 2 * (cons[None] & (px[:, None] != par[None])) * amin * bmin[None]
        top = score.topk(min(2, len(comp)), dim=1)
        best, o = top.values[:, 0], top.indices[:, 0]
        flag = (a[:, :-1] - a[:, 1:]).min(1).values < COORD_GAP
        flag |= amin[:, 0] < COORD_GAP
        if len(comp) > 1:
            flag |= (top.values[:, 0] - top.values[:, 1]) <= ORBIT_MARGIN
        # the codeword: sorted position j of x gets the orbit's j-th largest |c| with x's sign, the
        # smallest one's sign flipped on a parity mismatch
        flip = cons[o] & (px != par[o])
        neg = torch.gather(xn, 1, order) < 0
        neg[:, DIM - 1] ^= flip
        d = dv[o]
        zero = torch.gather(reps[o], 1, torch.arange(DIM, device=dev).expand_as(d)) == 0
        digit_sorted = d * 2 + (neg & ~zero).long()
        digit = torch.empty_like(digit_sorted).scatter_(1, order, digit_sorted)
        key = comp.to(dev)[o] * (16 ** DIM) + (digit * pow16).sum(1)
        idx = orb.lookup(key.cpu())
        if len(inc_ids):
            bound = (a @ inc_reps.T - 2 * (inc_cons[None] & (px[:, None] != inc_par[None])) * amin
                     * inc_bmin[None]).max(1).values
            rows = torch.nonzero(bound >= best - ORBIT_MARGIN).reshape(-1)
            if rows.numel():
                rows_c = rows.cpu()
                j = inc_ids[_nearest_dense(v64[i:i + chunk][rows_c], cb64[inc_ids], dev, budget)]
                s_inc = (xn[rows] * cb64[j].to(dev)).sum(1)
                take = s_inc > best[rows]
                flag[rows] |= (s_inc - best[rows]).abs() <= ORBIT_MARGIN
                take_c = take.cpu()
                idx[rows_c[take_c]] = j[take_c]
        flag = flag.cpu()
        if bool(flag.any()):
            f = torch.nonzero(flag).reshape(-1)
            xf = v64[i:i + chunk][f]
            idx[f] = torch.cat([(xf[s:s + 4096] @ cb64.T).argmax(1) for s in range(0, len(f), 4096)])
        out[i:i + chunk] = idx
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
    counts = torch.bincount(nearest(x, cand), minlength=len(cand)).numpy()
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
        counts = torch.bincount(nearest(x, cand[ids]), minlength=len(ids)).numpy()[len(chosen):]
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
        a = nearest(x, c)
        s = torch.zeros_like(c).index_add_(0, a, x)
        norm = s.norm(dim=1, keepdim=True)
        c = torch.where(norm > 0, s / norm.clamp_min(1e-30), c)
    return c


__all__ = ["direction_codebook", "nearest", "codebook_digest", "e8_points", "e8_directions", "lloyd_max_chi",
           "chi_mean_factor", "kmeans_directions", "DIM"]

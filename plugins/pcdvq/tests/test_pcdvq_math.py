"""PCDVQ codebooks and quantizer against independent float64 references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from overdrive.kernels.hadamard import hadamard_matrix_of
from overdrive.pcdvq.codebook import direction_codebook, e8_points, kmeans_directions, lloyd_max_chi
from overdrive.pcdvq.config import PCDVQConfig
from overdrive.pcdvq.quantizer import (dequantize_weight, hadamard_mixer, layer_signs, quantize_weight,
                                       rotate, unrotate)


def test_e8_shell_sizes_and_membership():
    z = e8_points(6)
    sq = (z * z).sum(1)
    # theta series of E8: 240, 2160, 6720 points of squared norm 2, 4, 6
    assert [int((sq == 4 * m).sum()) for m in (2, 4, 6)] == [240, 2160, 6720]
    parity = z % 2
    assert ((parity == parity[:, :1]).all(1)).all()  # all-integer or all-half-integer
    assert (z.sum(1) % 4 == 0).all()  # even coordinate sum of x = z / 2


@pytest.mark.parametrize("k", [8, 11])
def test_direction_codebook_properties(k):
    cb = direction_codebook(k, 1 << 13)
    assert cb.shape == (1 << k, 8)
    assert torch.allclose(cb.double().norm(dim=1), torch.ones(1 << k, dtype=torch.float64), atol=1e-6)
    g = cb.double() @ cb.double().T
    g.fill_diagonal_(-2)
    assert g.max() < 1 - 1e-6  # no duplicate directions


def _coverage(cb: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ cb.double().T).max(1).values.mean())


def test_direction_coverage_vs_random_and_kmeans():
    k = 10
    g = torch.Generator().manual_seed(123)
    x = torch.randn(8000, 8, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    e8 = _coverage(direction_codebook(k, 1 << 13), x)
    rnd = torch.randn(1 << k, 8, generator=g, dtype=torch.float64)
    rnd = rnd / rnd.norm(dim=1, keepdim=True)
    train = torch.randn(16384, 8, generator=g, dtype=torch.float64)
    km = kmeans_directions(train / train.norm(dim=1, keepdim=True), 1 << k, iters=10)
    cov_rnd, cov_km = _coverage(rnd, x), _coverage(km, x)
    assert e8 > cov_rnd + 0.003, (e8, cov_rnd)
    print("coverage e8 %.4f random %.4f kmeans %.4f" % (e8, cov_rnd, cov_km))
    assert e8 > cov_km - 0.005, (e8, cov_km)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_lloyd_max_chi8_fixed_point(bits):
    from scipy import integrate
    from scipy.stats import chi

    levels, bounds = lloyd_max_chi(bits)
    f = chi(8).pdf
    edges = [0.0, *bounds, 40.0]
    for i, lv in enumerate(levels):
        num = integrate.quad(lambda r: r * f(r), edges[i], edges[i + 1], epsabs=1e-14, epsrel=1e-12)[0]
        den = integrate.quad(f, edges[i], edges[i + 1], epsabs=1e-14, epsrel=1e-12)[0]
        assert abs(num / den - lv) < 1e-8
    assert np.allclose(bounds, (levels[1:] + levels[:-1]) / 2, atol=1e-15, rtol=0)
    assert (np.diff(levels) > 0).all()


@pytest.mark.parametrize("block", [16, 24])
def test_hadamard_undone_exactly(block):
    cfg = PCDVQConfig(hadamard_block=block, direction_bits=8)
    w = torch.randn(5, 48, dtype=torch.float64)
    s = layer_signs(48, 0)
    assert torch.allclose(unrotate(rotate(w, s, cfg), s, cfg), w, atol=1e-12, rtol=0)
    t = hadamard_matrix_of(48, s.double(), hadamard_mixer(cfg), block)
    assert torch.allclose(rotate(w, s, cfg), w @ t, atol=1e-12, rtol=0)


def _reference(w: torch.Tensor, name: str, cfg: PCDVQConfig, cb: torch.Tensor) -> torch.Tensor:
    """Plain float64 PCDVQ: rotate by the dense T, nearest direction by cosine, nearest χ level,
    least-squares row scale, rotate back."""
    n, k = w.shape
    t = hadamard_matrix_of(k, layer_signs(k, cfg.seed).double(), hadamard_mixer(cfg), cfg.hadamard_block)
    wr = w.double() @ t
    levels, _ = lloyd_max_chi(cfg.magnitude_bits)
    levels = torch.from_numpy(levels)
    c = cb.double()
    out = torch.empty_like(wr)
    for i in range(n):
        rms = math.sqrt(float((wr[i] ** 2).mean()))
        u = torch.empty(k, dtype=torch.float64)
        for j in range(k // 8):
            v = wr[i, 8 * j:8 * j + 8]
            cos = (c @ v) / v.norm()
            d = int(cos.argmax())
            m = int((levels - v.norm() / rms).abs().argmin())
            u[8 * j:8 * j + 8] = levels[m] * c[d]
        s = float(torch.tensor(float(wr[i] @ u / (u @ u))).float())  # stored as float32
        out[i] = s * u
    return out @ t.T


@pytest.mark.parametrize("block", [32, 96])
def test_quantize_dequantize_matches_float64_reference(block):
    cfg = PCDVQConfig(direction_bits=8, magnitude_bits=2, hadamard_block=block, codebook_samples=1 << 12)
    cb = direction_codebook(8, 1 << 12)
    w = torch.randn(6, 192, generator=torch.Generator().manual_seed(1)) * 0.02
    t = quantize_weight("layer.q_proj.weight", w, cfg, cb)
    assert t["dir_codes"].dtype == torch.int16 and t["dir_codes"].shape == (6, 24)
    assert t["mag_codes"].dtype == torch.uint8 and t["mag_codes"].shape == (6, 6)
    got = dequantize_weight(t, cfg, cb, torch.float64)
    ref = _reference(w, "layer.q_proj.weight", cfg, cb)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    # and it is a quantization, not an identity: relative error of a 1.25-bit code is large but < 1
    err = float((got - w.double()).norm() / w.double().norm())
    assert 0.05 < err < 0.8


def test_16bit_direction_codes_roundtrip():
    from overdrive.pcdvq.quantizer import dir_from_int16, dir_to_int16, pack_mags, unpack_mags

    c = torch.tensor([[0, 1, 32767, 32768, 65535, 40000]])
    assert torch.equal(dir_from_int16(dir_to_int16(c)).long(), c)
    m = torch.randint(0, 4, (3, 16))
    assert torch.equal(unpack_mags(pack_mags(m, 2), 2).long(), m)
    assert int(pack_mags(torch.tensor([[3, 0, 1, 2]]), 2)) == 3 | (1 << 4) | (2 << 6)


def _near_tie_inputs(cb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian vectors plus the hard cases of a fast argmax: midpoints of two codewords (exact ties and
    ties broken by 1e-13 .. 1e-5), codewords themselves (ties inside an orbit), repeated and zero
    coordinates, scaled by varied norms."""
    c = cb.double()
    x = [torch.randn(20000, 8, generator=g, dtype=torch.float64)]
    i = torch.randint(0, len(c), (3000,), generator=g)
    j = torch.randint(0, len(c), (3000,), generator=g)
    mid = c[i] + c[j]
    for eps in (0.0, 1e-13, 1e-9, 1e-7, 1e-5):
        x.append(mid + eps * torch.randn(mid.shape, generator=g, dtype=torch.float64))
    x.append(c[i])
    y = torch.randn(3000, 8, generator=g, dtype=torch.float64)
    y[:1000, 3] = y[:1000, 5]
    y[1000:2000, 2] = 0
    y[2000:] = y[2000:].round()
    x.append(y)
    x = torch.cat(x)
    return x * torch.exp(torch.randn(len(x), 1, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["e8-k10", "e8-k11", "random"])
def test_nearest_equals_the_float64_argmax(kind):
    from overdrive.pcdvq.codebook import _orbits_of, nearest

    g = torch.Generator().manual_seed(7)
    if kind == "random":  # no symmetry: the float32 matmul path with its float64 re-check only
        cb = torch.randn(1500, 8, generator=g)
        cb = cb / cb.norm(dim=1, keepdim=True)
    else:
        cb = direction_codebook(int(kind[-2:]), 1 << 13)
        orb = _orbits_of(cb.double().numpy().tobytes(), tuple(cb.shape))
        # complete orbits in closed form, and a cut orbit scored densely
        assert bool(orb.complete.any()) and bool((~orb.complete).any())
    x = _near_tie_inputs(cb, g)
    ref = torch.cat([(x[s:s + 4096] @ cb.double().T).argmax(1) for s in range(0, len(x), 4096)])
    got = nearest(x, cb)
    assert torch.equal(got, ref), int((got != ref).sum())

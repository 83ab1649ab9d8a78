"""Hessian-aware PCDVQ (GPTQ-style VQ) against an independent float64 implementation of the update."""
from __future__ import annotations

import torch

from overdrive.kernels.hadamard import hadamard_matrix_of
from overdrive.pcdvq.codebook import direction_codebook, lloyd_max_chi
from overdrive.pcdvq.config import PCDVQConfig
from overdrive.pcdvq.gptvq import quantize_weight_hessian
from overdrive.pcdvq.quantizer import dequantize_weight, hadamard_mixer, layer_signs, quantize_weight

CFG = PCDVQConfig(direction_bits=8, magnitude_bits=2, hadamard_block=32, codebook_samples=1 << 12)


def _layer(n=12, k=64, tokens=400, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.02
    # correlated inputs with a few large channels, as in LLM activations
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix
    x[:, :4] *= 6
    return w, x


def _reference(w, x, cfg, cb, percdamp=0.01):
    """Dense T, explicit solves on H restricted to the columns not yet quantized, plain loops."""
    n, k = w.shape
    t = hadamard_matrix_of(k, layer_signs(k, cfg.seed).double(), hadamard_mixer(cfg), cfg.hadamard_block)
    wr, xr = w @ t, x @ t
    h = 2 * xr.T @ xr
    hd = h + percdamp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    levels, _ = lloyd_max_chi(cfg.magnitude_bits)
    levels = torch.from_numpy(levels)
    c = cb.double()
    s0 = wr.pow(2).mean(1).sqrt()
    cur = wr.clone()
    un = torch.zeros_like(wr)
    for j in range(0, k, 8):
        q = torch.zeros(n, 8, dtype=torch.float64)
        for i in range(n):
            v = cur[i, j:j + 8]
            d = int((c @ v).argmax())
            m = int((levels - v.norm() / s0[i]).abs().argmin())
            un[i, j:j + 8] = levels[m] * c[d]
            q[i] = s0[i] * un[i, j:j + 8]
        change = q - cur[:, j:j + 8]
        cur[:, j:j + 8] = q
        if j + 8 < k:
            rest = slice(j + 8, k)
            cur[:, rest] -= change @ hd[j:j + 8, rest] @ torch.linalg.inv(hd[rest, rest])
    s = torch.stack([(wr[i] @ h @ un[i]) / (un[i] @ h @ un[i]) for i in range(n)])
    return (s.float().double()[:, None] * un) @ t.T, s


def test_error_feedback_equals_the_float64_reference():
    w, x = _layer()
    cb = direction_codebook(8, 1 << 12)
    h = 2 * x.T @ x
    got_t = quantize_weight_hessian("l.q_proj.weight", w, h, CFG, cb, block_size=32)  # lazy blocks cross groups
    got = dequantize_weight(got_t, CFG, cb, torch.float64)
    ref, s = _reference(w, x, CFG, cb)
    assert torch.allclose(got_t["scales"].double(), s.float().double(), rtol=1e-6, atol=0)
    assert torch.allclose(got, ref, atol=1e-9, rtol=0)


def test_hessian_aware_lowers_the_output_error():
    w, x = _layer(n=32, k=128, tokens=600, seed=5)
    cb = direction_codebook(8, 1 << 12)
    plain = dequantize_weight(quantize_weight("l.q_proj.weight", w, CFG, cb), CFG, cb, torch.float64)
    hess = dequantize_weight(quantize_weight_hessian("l.q_proj.weight", w, 2 * x.T @ x, CFG, cb), CFG, cb,
                             torch.float64)
    e_plain = float(((w - plain) @ x.T).norm())
    e_hess = float(((w - hess) @ x.T).norm())
    print(f"output error: plain {e_plain:.4g}, Hessian-aware {e_hess:.4g}")
    assert e_hess < 0.8 * e_plain
    # with H = I the objective is the weight error: no worse than plain assignment's
    eye = quantize_weight_hessian("l.q_proj.weight", w, torch.eye(128, dtype=torch.float64), CFG, cb, percdamp=0.0)
    e_eye = float((w - dequantize_weight(eye, CFG, cb, torch.float64)).norm())
    assert e_eye <= float((w - plain).norm()) * (1 + 1e-9)

"""Hessian-aware PCDVQ assignment: GPTQ-style vector quantization (leaf math: torch and overdrive.kernels).

For a linear layer ``y = x W^T`` with calibration inputs ``X`` and ``H = 2 X^T X`` (K, K), plain PCDVQ
(:func:`overdrive.pcdvq.quantizer.quantize_weight`) picks each 8-vector's codes independently. Here the
objective is the output error ``tr((W - Q) H (W - Q)^T)``. In the rotated basis (``W' = W T``, inputs
``x T``, so ``H' = T^T H T``) the 8-column groups are quantized in order, each with PCDVQ's rule (the
direction of largest cosine, the χ(8) Lloyd–Max level of ``|v| / s0[n]``, ``s0`` the row RMS of ``W'``),
and the group's error ``E = v - q`` (N, 8) is spread over the columns not yet quantized by the optimal
update given those columns (OBS, as in GPTQ): ``W'_R -= E U_GG^-1 U_GR`` with ``U`` the upper Cholesky
factor of ``H'^-1`` (``H'`` dampened by ``percdamp`` times its mean diagonal); this equals
``W'_R -= (q - v) H'_GR H'_RR^-1`` with ``H'`` restricted to the columns not yet quantized (G, then
R), the least-squares compensation of the group's change. Updates are applied
lazily ``block_size`` columns at a time. Finally the per-row scale is refit by least squares in the
``H'`` norm, ``s[n] = <W'_n H', U_n> / <U_n H', U_n>`` (``U`` the unscaled reconstruction), which can only
lower the objective from ``s0``.
"""
from __future__ import annotations

import torch

from .codebook import DIM, lloyd_max_chi, nearest
from .config import PCDVQConfig
from .quantizer import check_shape, dir_to_int16, layer_signs, pack_mags, rotate


def rotate_hessian(h: torch.Tensor, signs: torch.Tensor, cfg: PCDVQConfig) -> torch.Tensor:
    """``T^T H T`` (H symmetric): the Hessian of the rotated inputs ``x T``."""
    return rotate(rotate(h, signs, cfg).T.contiguous(), signs, cfg)


def dampen(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``H + percdamp * mean(diag H) * I``; a column never seen (zero diagonal) gets the mean too."""
    h = h.clone()
    d = torch.diagonal(h)
    live = d > 0
    mean = float(d[live].mean()) if bool(live.any()) else 1.0
    d[~live] = mean
    d.add_(percdamp * mean)
    return h


@torch.no_grad()
def quantize_weight_hessian(name: str, w: torch.Tensor, h: torch.Tensor, cfg: PCDVQConfig, codebook: torch.Tensor,
                            device: str | torch.device | None = None, percdamp: float = 0.01,
                            block_size: int = 128) -> dict[str, torch.Tensor]:
    """The stored tensors of ``w`` (N, K) quantized against the Hessian ``h`` (K, K) of its inputs
    (the format of :func:`overdrive.pcdvq.quantizer.quantize_weight`); float64 math on ``device``."""
    check_shape(name, tuple(w.shape), cfg)
    n, k = w.shape
    if tuple(h.shape) != (k, k):
        raise ValueError(f"tensor {name!r}: Hessian of shape {tuple(h.shape)} for {k} input features")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # the group loop is thousands of small ops: on CPU, intra-op threads only spin (as in
    # overdrive.mbq.gptq), so it runs on one thread
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _quantize(name, w, h, cfg, codebook, dev, percdamp, block_size)
    finally:
        torch.set_num_threads(threads)


def _quantize(name: str, w: torch.Tensor, h: torch.Tensor, cfg: PCDVQConfig, codebook: torch.Tensor,
              dev: torch.device, percdamp: float, block_size: int) -> dict[str, torch.Tensor]:
    n, k = w.shape
    levels, bounds = (torch.from_numpy(a).to(dev) for a in lloyd_max_chi(cfg.magnitude_bits))
    signs = layer_signs(k, cfg.seed)
    wr = rotate(w.detach().to(torch.float64).cpu(), signs, cfg).to(dev)
    hr = rotate_hessian(h.detach().to(torch.float64).cpu(), signs, cfg).to(dev)
    hd = dampen(hr, percdamp)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    cb = codebook.to(dev, torch.float64)
    s0 = wr.pow(2).mean(1).sqrt().clamp_min(1e-30)
    W = wr.clone()
    dirs = torch.empty(n, k // DIM, dtype=torch.long, device=dev)
    mags = torch.empty(n, k // DIM, dtype=torch.long, device=dev)
    for b1 in range(0, k, block_size):
        b2 = min(b1 + block_size, k)
        W1 = W[:, b1:b2]  # a view: updated in place
        err1 = torch.zeros_like(W1)
        for g1 in range(0, b2 - b1, DIM):
            g2 = g1 + DIM
            v = W1[:, g1:g2]
            d = nearest(v, cb, dev).to(dev)
            m = torch.bucketize(v.norm(dim=1) / s0, bounds)
            q = (s0 * levels[m])[:, None] * cb[d]
            e = torch.linalg.solve_triangular(u[b1 + g1:b1 + g2, b1 + g1:b1 + g2], v - q, upper=True, left=False)
            W1[:, g2:] -= e @ u[b1 + g1:b1 + g2, b1 + g2:b2]
            err1[:, g1:g2] = e
            dirs[:, (b1 + g1) // DIM], mags[:, (b1 + g1) // DIM] = d, m
        W[:, b2:] -= err1 @ u[b1:b2, b2:]
    un = (levels[mags][..., None] * cb[dirs]).reshape(n, k)
    uh = un @ hr
    s = (wr * uh).sum(1) / (un * uh).sum(1).clamp_min(1e-300)
    return {"dir_codes": dir_to_int16(dirs.cpu()),
            "mag_codes": pack_mags(mags.cpu(), cfg.magnitude_bits),
            "scales": s.to(torch.float32).cpu(),
            "hadamard_signs": signs}

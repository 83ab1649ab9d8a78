"""Quality metrics shared by the methods and the benchmarks: image fidelity against a reference (PSNR and
SSIM, Gaussian window 11, sigma 1.5: DiTFastAttn's benchmark, VGDFR's frame-similarity schedule and
benchmark) and the token negative log-likelihood every perplexity is built from.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

K1, K2 = 0.01, 0.03


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) over the whole tensor; inf for identical inputs."""
    mse = float(((x.double() - ref.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) of (N, C, H, W) images, per channel, valid windows only, float64.

    The window is 11 x 11 (sigma 1.5), or the largest odd size that fits images smaller than 11.
    """
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    n, c, h, w = x.shape
    size = min(11, h, w)
    size -= 1 - size % 2  # odd, and never larger than the image
    win = _gaussian(size).to(x.device)
    win = win.expand(c, 1, *win.shape)
    a, b = x.double(), ref.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of (N, C, H, W) images (all images, channels and valid windows)."""
    return float(ssim_map(x, ref, data_range).mean())


def ssim_per_image(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N,) mean SSIM of each image pair of two (N, C, H, W) batches."""
    return ssim_map(x, ref, data_range).flatten(1).mean(1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood (float64) of ``targets`` (...) under ``logits`` (..., V); the logits at
    a position score the target at the same position (shift them first for next-token NLL). Perplexity is
    ``exp(sum / count)`` over everything summed."""
    lg = logits.double()
    return float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="sum"))

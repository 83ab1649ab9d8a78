"""ViDiT-Q's quantization math in plain torch (offline; the runtime is overdrive.kernels.act8_linear).

* weights: symmetric per output channel, ``bits`` 8 (int8 codes in [-127, 127]) or 4 (codes in
  [-7, 7], stored as ``code + 8`` packed 8 per int32 word), after channel balancing;
* channel balancing (SmoothQuant-style, per timestep range): ``s[k] = amax_x[k]^alpha /
  amax_w[k]^(1 - alpha)``; the weight's input channel k is multiplied by ``s[k]`` before it is
  quantized and the activation is divided by it (fused into the kernel), so ``x @ W.T`` is unchanged
  before rounding while outlier activation channels move into the weights;
* activations: dynamic per-token symmetric int8 (in the kernel).

Everything is computed in float64 so the stored codes do not depend on the calibration dtype.
"""
from __future__ import annotations

import torch

from overdrive.kernels import pack
from overdrive.kernels.act8_linear import round_half_away

EPS = 1e-5


def smoothing_factors(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel divisors (float32) from activation and weight channel maxima."""
    a = act_max.to(torch.float64).clamp_min(EPS)
    w = w_max.to(torch.float64).clamp_min(EPS)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(1e-4, 1e4).to(torch.float32)


def weight_channel_max(w: torch.Tensor) -> torch.Tensor:
    """max |W[:, k]| per input channel."""
    return w.detach().to(torch.float64).abs().amax(dim=0)


def quantize_weight(w: torch.Tensor, bits: int, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored codes, float32 per-output-channel scales) of a (N, K) weight, balanced by ``smooth``.

    8 bits: int8 (N, K); 4 bits: int32 (N, ceil(K/8)) holding ``code + 8`` (overdrive.kernels.packing).
    """
    qmax = 127 if bits == 8 else 7
    wd = w.detach().to(torch.float64)
    if smooth is not None:
        wd = wd * smooth.to(torch.float64)[None, :]
    scale = (wd.abs().amax(dim=1) / qmax).clamp_min(1e-12).to(torch.float32)
    codes = round_half_away(wd / scale.to(torch.float64)[:, None]).clamp(-qmax, qmax)
    stored = codes.to(torch.int8) if bits == 8 else pack((codes + 8).to(torch.int64), 4)
    return stored, scale


def relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """sum |a - b|^2 / sum |b|^2 over a list of outputs (float64)."""
    num = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(outs, refs))
    den = sum(float((b.double() ** 2).sum()) for b in refs)
    return num / max(den, 1e-30)

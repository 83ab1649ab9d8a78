"""PM-KVQ's math (a leaf: torch, scipy and the plan format only): budgets, the bit-width allocation, the
per-token group quantizer, key maxima and scales, the reparameterisation search and the sensitivity terms.

The pipeline that drives a model through these is :mod:`.calibrate` (its docstring explains the steps).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.kernels import kv_dequantize, kv_quantize

ALPHAS = [round(1.0 - 0.05 * i, 2) for i in range(20)]  # 1.0, 0.95, ..., 0.05


# ------------------------------------------------------------------------------------ budgets
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(spec: str, ident: ModelIdentity, max_len: int) -> int:
    """Bytes of KV memory for one ``max_len``-token sequence, from ``"4GiB"``, ``"300MB"`` or ``"3.5bpe"``.

    ``bpe`` (or ``bits``): average bits per cached K/V element, i.e. bytes =
    bits / 8 * 2 * layers * KV heads * head size * max_len.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(spec))
    if not m:
        raise ConfigError(f"--budget {spec!r}: expected a number with a unit, e.g. 2GiB, 300MiB or 3.5bpe")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("bpe", "bits", "bit"):
        elems = 2 * ident.num_layers * ident.num_kv_heads * ident.head_size * max_len
        return int(value / 8 * elems)
    if unit not in _UNITS:
        raise ConfigError(f"--budget {spec!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, KiB, MiB, GiB or bpe")
    return int(value * _UNITS[unit])


def allocate(sensitivity: Sequence[dict[int, float]], memory: Sequence[dict[int, int]], budget: int
             ) -> list[int]:
    """One width per layer minimising total sensitivity with total memory <= budget (``scipy.optimize.milp``)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers = len(sensitivity)
    cands = [sorted(s) for s in sensitivity]
    minimum = sum(min(memory[i][b] for b in cands[i]) for i in range(layers))
    if budget < minimum:
        low = sorted({min(c) for c in cands})
        raise ConfigError(
            f"budget of {budget} bytes is below the minimum of {minimum} bytes ({'/'.join(map(str, low))} bits on "
            f"every layer); raise --budget to at least {minimum} bytes ({minimum / 2**20:.2f} MiB) or shorten --max-len")
    index = [(i, b) for i in range(layers) for b in cands[i]]
    n = len(index)
    c = np.array([sensitivity[i][b] for i, b in index], dtype=np.float64)
    eq = np.zeros((layers, n))
    for j, (i, _) in enumerate(index):
        eq[i, j] = 1.0
    mem = np.array([[memory[i][b] for i, b in index]], dtype=np.float64)
    res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(eq, 1, 1), LinearConstraint(mem, 0, float(budget))])
    if not res.success:
        raise ConfigError(f"PM-KVQ allocation failed: {res.message}")
    chosen = [0] * layers
    for j, (i, b) in enumerate(index):
        if res.x[j] > 0.5:
            chosen[i] = b
    return chosen


# -------------------------------------------------------------------------- statistics, search
def qdq(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize-dequantize along the last dim with PM-KVQ's per-token group quantizer (float32 math)."""
    p, s, z = kv_quantize(x.detach().float(), bits, group)
    return kv_dequantize(p, s, z, bits, x.shape[-1], group, torch.float32)


def pair_max(absmax: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D) where channels c and c + D/2 both hold max of the two (rotary pairs)."""
    half = absmax.shape[-1] // 2
    m = torch.maximum(absmax[..., :half], absmax[..., half:])
    return torch.cat([m, m], dim=-1)


def scales_for(maxk: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = maxK ** alpha per (KV head, channel), normalised to geometric mean 1 per head."""
    s = maxk.double().clamp_min(1e-6) ** alpha
    s = s / torch.exp(torch.log(s).mean(dim=-1, keepdim=True))
    return s.float()


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, Hq, S, D), k/v (B, Hk, S, D) -> (B, Hq, S, D), float32, causal, GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def search_alpha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, maxk: torch.Tensor, group: int,
                 bits: int = 4, alphas: Sequence[float] = ALPHAS) -> tuple[float, float, float]:
    """(best alpha (0 = no scaling), its attention-output MSE, the MSE without scaling)."""
    q, k, v = q.float(), k.float(), v.float()
    ref = _causal_attention(q, k, v)
    vq = qdq(v, bits, group)
    rep = q.shape[1] // k.shape[1]

    def err(alpha: float) -> float:
        if alpha == 0:
            return float(((_causal_attention(q, qdq(k, bits, group), vq) - ref) ** 2).mean())
        s = scales_for(maxk, alpha)[None, :, None, :]  # (1, Hk, 1, D)
        kq = qdq(k / s, bits, group)
        qs = q * s.repeat_interleave(rep, 1)
        return float(((_causal_attention(qs, kq, vq) - ref) ** 2).mean())

    base = err(0.0)
    best, best_err = 0.0, base
    for a in alphas:
        e = err(a)
        if e < best_err:
            best, best_err = a, e
    return best, best_err, base


def layer_sensitivity(k: torch.Tensor, gk: torch.Tensor, v: torch.Tensor, gv: torch.Tensor, group: int,
                      bits: Sequence[int]) -> dict[int, float]:
    """mean |(Q_b(K) - K) * dL/dK| + mean |(Q_b(V) - V) * dL/dV| for each width b."""
    if gk is None or gv is None:
        raise RuntimeError("no gradient reached a layer's K/V; is the model's attention on the probe path?")
    k, v, gk, gv = k.detach().float(), v.detach().float(), gk.float(), gv.float()
    return {b: float(((qdq(k, b, group) - k) * gk).abs().mean() + ((qdq(v, b, group) - v) * gv).abs().mean())
            for b in bits}

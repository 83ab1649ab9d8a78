"""GPTQ (Frantar et al., 2022): second-order, column-by-column weight quantization with error feedback.

A leaf module (torch only). For a linear layer ``y = x W^T`` with calibration inputs ``X`` (tokens,
K), GPTQ minimises ``sum_t w_t |x_t (W - Q)^T|^2`` over quantized ``Q``, one input column at a time:
quantize column ``j``, then spread its error over the columns not yet quantized, in proportion to the
inverse Hessian ``H^-1`` of the objective (``H = 2 X^T diag(w) X``). The per-token weights ``w``
(all 1 for plain GPTQ) are how MBQ's modality balance enters: the vision / caption token weights of
:func:`overdrive.mbq.calibrate._token_weights`.

* :class:`Hessian` accumulates ``H`` from batches of inputs (streaming; float32 or float64).
* :func:`gptq` quantizes a (N, K) weight given ``H``: dampening by ``percdamp`` times the mean
  diagonal, dead columns (zero diagonal: inputs never seen) quantized to nearest without feedback,
  the upper Cholesky factor of ``H^-1``, lazy batch updates ``block_size`` columns at a time, and
  optional activation order (columns by decreasing ``H`` diagonal) with *static* groups (group
  parameters from the unquantized weight, so group ``g`` still holds columns ``g*G .. g*G+G-1`` and the
  checkpoint layout is MBQ's).
* Quantization grids (:class:`GroupAsymmetric`, :class:`ChannelSymmetric`) are the ones of MBQ's RTN
  (overdrive.mbq.quant.rtn_codes / rtn_per_channel_symmetric): with ``H = I`` GPTQ returns RTN's
  codes. Group scales and zero points are computed from the *current* (error-updated) weights when
  the group's first column is reached (unless static).

The result carries float codes / scales / zeros in the shapes of RTN's, so the checkpoint writer
packs them into the tensors every runtime already reads.
"""
from __future__ import annotations

import dataclasses
import math

import torch


class Hessian:
    """Streaming ``H = 2 X^T diag(w) X / sum(w)`` of one layer's (K-feature) inputs.

    The normalisation by the total token weight does not change GPTQ's result (the dampening is
    relative to the mean diagonal); it keeps ``H`` of comparable size across calibration sets.
    """

    def __init__(self, k: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.h = torch.zeros(k, k, dtype=dtype, device=device)
        self.weight = 0.0

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """Add inputs ``x`` (..., K) with optional per-token weights ``w`` (x.shape[:-1], >= 0)."""
        k = self.h.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"Hessian of {k} features got inputs with {x.shape[-1]}")
        x = x.reshape(-1, k).to(self.h)
        if w is None:
            total = float(x.shape[0])
        else:
            w = w.reshape(-1).to(self.h)
            if w.numel() != x.shape[0]:
                raise ValueError(f"{w.numel()} token weights for {x.shape[0]} tokens")
            if bool((w < 0).any()):
                raise ValueError("token weights must be non-negative")
            total = float(w.sum())
            x = x * w.sqrt()[:, None]
        if total <= 0:
            return
        new = self.weight + total
        self.h.mul_(self.weight / new).addmm_(x.T, x, alpha=2.0 / new)
        self.weight = new

    def get(self) -> torch.Tensor:
        return self.h


# ------------------------------------------------------------------------------- grids
@dataclasses.dataclass(frozen=True)
class GroupAsymmetric:
    """MBQ's weight-only grid: unsigned ``bits``-bit codes, per group of ``group_size`` input columns a
    scale ``(max(w, 0) - min(w, 0)) / (2^bits - 1)`` and a zero point ``round(-min(w, 0) / scale)``.
    ``scale_dtype``: round scales to the checkpoint's storage dtype before use (float16), so the error
    fed back is that of the weights the runtime will compute; None keeps them in float."""

    bits: int
    group_size: int
    scale_dtype: torch.dtype | None = torch.float16

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) of (N, G) columns of one group, in w's dtype."""
        qmax = (1 << self.bits) - 1
        wmin = w.amin(dim=1).clamp(max=0.0)
        wmax = w.amax(dim=1).clamp(min=0.0)
        s = ((wmax - wmin) / qmax).clamp(min=1e-8)
        if self.scale_dtype is not None:
            s = s.to(self.scale_dtype).to(w.dtype).clamp(min=1e-8)
        z = torch.round(-wmin / s).clamp(0, qmax)
        return s, z

    def quantize(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized) of a column (N,) with its group's (scales, zeros)."""
        q = torch.clamp(torch.round(w / s) + z, 0, (1 << self.bits) - 1)
        return q, (q - z) * s


@dataclasses.dataclass(frozen=True)
class ChannelSymmetric:
    """MBQ's W4A8/W8A8 grid: signed codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1], one scale
    ``max|w| / qmax`` per output channel, from the whole (unquantized) row."""

    bits: int
    scale_dtype: torch.dtype | None = torch.float16

    @property
    def group_size(self) -> None:
        return None

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = (1 << (self.bits - 1)) - 1
        s = (w.abs().amax(dim=1) / qmax).clamp(min=1e-8)
        if self.scale_dtype is not None:
            s = s.to(self.scale_dtype).to(w.dtype).clamp(min=1e-8)
        return s, torch.zeros_like(s)

    def quantize(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = (1 << (self.bits - 1)) - 1
        q = torch.clamp(torch.round(w / s), -qmax, qmax)
        return q, q * s


Grid = GroupAsymmetric | ChannelSymmetric


@dataclasses.dataclass
class GPTQResult:
    """codes (N, K) float; scales / zeros (N, K/G) for group grids, (N,) for per-channel ones (zeros
    all 0); ``weight``: the dequantized (N, K) weight in the input dtype; ``error``: the calibration
    objective ``tr((W - Q) H (W - Q)^T)`` before dampening (float)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    weight: torch.Tensor
    error: float


def objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the (token-weighted) squared output error GPTQ minimises."""
    d = (w.to(h) - q.to(h))
    return float(((d @ h) * d).sum())


@torch.no_grad()
def gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, *, block_size: int = 128, percdamp: float = 0.01,
         act_order: bool = False, static_groups: bool | None = None,
         dtype: torch.dtype = torch.float32) -> GPTQResult:
    """Quantize the (N, K) weight ``w`` against the (K, K) Hessian ``h`` on ``grid``.

    ``dtype``: float32 (default) or float64 for every step of the math. ``static_groups`` (default:
    ``act_order``): group parameters from the unquantized weight before any error feedback; required
    with ``act_order`` so every group still holds contiguous columns.
    """
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} for a weight with {k} input features")
    g = grid.group_size
    if g is not None and k % g:
        raise ValueError(f"{k} input features are not a multiple of group size {g}")
    if static_groups is None:
        static_groups = act_order
    if act_order and g is not None and not static_groups:
        raise ValueError("activation order with group-wise grids needs static groups (the checkpoint layout "
                         "keeps contiguous groups)")
    if not 0 <= percdamp:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    w0 = w.detach().to(dtype)
    W = w0.clone()
    H = h.detach().to(dtype).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    if bool(dead.any()):
        # inputs never seen: no information; isolate the column (quantized to nearest, no feedback)
        H[dead, :] = 0
        H[:, dead] = 0
        diag[dead] = 1
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag.add_(percdamp * mean)

    ngroups = k // g if g is not None else 1
    scales = torch.zeros(n, ngroups, dtype=dtype, device=W.device)
    zeros = torch.zeros(n, ngroups, dtype=dtype, device=W.device)
    if g is None:
        s, z = grid.params(W)
        scales[:, 0], zeros[:, 0] = s, z
    elif static_groups:
        for j in range(ngroups):
            scales[:, j], zeros[:, j] = grid.params(W[:, j * g:(j + 1) * g])

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else \
        torch.arange(k, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    # the column loop is thousands of tiny ops: on CPU, intra-op threads only spin (measured on a
    # 576 x 576 layer: 25x the CPU time with 2 threads as with 1)
    threads = torch.get_num_threads()
    if W.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        _columns(W, Hinv, Q, codes, scales, zeros, perm, grid, g, static_groups, block_size)
    finally:
        torch.set_num_threads(threads)

    inv = torch.argsort(perm)
    codes, Q = codes[:, inv], Q[:, inv]
    if g is None:
        scales, zeros = scales[:, 0], zeros[:, 0]
    return GPTQResult(codes, scales, zeros, Q.to(w.dtype), objective(w0, Q, h.to(dtype)))


def _columns(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
             zeros: torch.Tensor, perm: torch.Tensor, grid: Grid, g: int | None, static_groups: bool,
             block_size: int) -> None:
    """GPTQ's column loop with lazy batch updates (fills ``Q``, ``codes``, and dynamic group params)."""
    k = W.shape[1]
    perm = perm.tolist()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i  # position in (permuted) order
            orig = perm[col]
            if g is not None and not static_groups and orig % g == 0:
                # the group's current weights: in this block, W1 (updated); beyond it, W plus the
                # pending lazy update of this block's columns quantized so far
                end = col + g
                cur = W1[:, i:min(end, i2) - i1]
                if end > i2:
                    rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                scales[:, orig // g], zeros[:, orig // g] = grid.params(cur)
            j = orig // g if g is not None else 0
            q, dq = grid.quantize(W1[:, i], scales[:, j], zeros[:, j])
            codes[:, col], Q[:, col] = q, dq
            err = (W1[:, i] - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


def rtn(w: torch.Tensor, grid: Grid, dtype: torch.dtype = torch.float32) -> GPTQResult:
    """Round to nearest on ``grid`` (no Hessian): the baseline GPTQ improves on. ``error`` is nan."""
    W = w.detach().to(dtype)
    n, k = W.shape
    g = grid.group_size
    if g is None:
        s, z = grid.params(W)
        q, dq = grid.quantize(W, s[:, None], z[:, None])
        return GPTQResult(q, s, z, dq.to(w.dtype), math.nan)
    codes, deq, ss, zz = [], [], [], []
    for j in range(k // g):
        s, z = grid.params(W[:, j * g:(j + 1) * g])
        q, dq = grid.quantize(W[:, j * g:(j + 1) * g], s[:, None], z[:, None])
        codes.append(q), deq.append(dq), ss.append(s), zz.append(z)
    return GPTQResult(torch.cat(codes, 1), torch.stack(ss, 1), torch.stack(zz, 1), torch.cat(deq, 1).to(w.dtype),
                      math.nan)

"""Hadamard transforms (random, block-diagonal, and composite sizes) for rotation-based quantization.

``hadamard_transform(x, signs, mixer, block)`` applies an orthogonal ``T`` to the last dimension of
``x`` (``y = x @ T``, rows as vectors), built from:

* ``block`` (default: the whole last dimension ``n``): ``T`` is block-diagonal with ``n / block``
  equal blocks; each block of ``block`` contiguous entries is transformed on its own (so a row-parallel
  shard holding whole blocks can apply its part alone).
* within a block of size ``b = m * p`` with ``p`` a power of two (:func:`split_size`: the largest
  power of two dividing ``b``): the block is viewed as an (m, p) matrix ``X``; the result is
  ``mixer^T @ X @ H_p``, with ``H_p`` the Sylvester Hadamard matrix scaled by ``1/sqrt(p)`` (symmetric,
  orthogonal) and ``mixer`` an orthogonal (m, m) matrix (required when ``m > 1``; e.g. 576 = 9 * 64:
  a 9 x 9 orthogonal block with a 64-Hadamard). In Kronecker form the block's ``T`` is ``mixer ⊗ H_p``.
* ``signs`` (n,) of +-1 (optional): ``x`` is multiplied by them first (a *random* Hadamard
  transform: ``T = diag(signs) @ blockdiag(mixer ⊗ H_p)``).

Every ``T`` is orthogonal, so folding ``T`` into a weight that reads ``x`` (``W' = hadamard_transform(W)``
on its rows, i.e. ``W T``) leaves ``x W^T = (x T)(W T)^T`` unchanged. :func:`random_hadamard` builds
seeded ``signs`` and ``mixer`` for any size. The power-of-two part runs as a Triton kernel on CUDA
(or in Triton's interpreter, ``OVERDRIVE_KERNELS=interpret``); the torch reference is a fast
Walsh–Hadamard transform (log2 p butterfly stages).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .dispatch import Op, register_op


def split_size(b: int) -> tuple[int, int]:
    """(m, p): ``b = m * p`` with ``p`` the largest power of two dividing ``b``."""
    if b <= 0:
        raise ValueError(f"Hadamard block size must be positive, got {b}")
    p = b & -b
    return b // p, p


def hadamard_matrix(p: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                    normalized: bool = True) -> torch.Tensor:
    """Sylvester Hadamard matrix of order ``p`` (a power of two): ``H[i, j] = (-1)^popcount(i & j)``."""
    if p <= 0 or p & (p - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two orders, got {p}")
    i = torch.arange(p, device=device)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    h = (1 - 2 * parity).to(dtype)
    return h / math.sqrt(p) if normalized else h


def fwht_reference(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_p`` (normalized) along the last dimension (a power of two), by butterflies, in x's dtype
    (float32 math for 16-bit inputs)."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fast Walsh-Hadamard transform needs a power-of-two size, got {p}")
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(dt).reshape(-1, p)
    h = 1
    while h < p:
        y = y.reshape(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(p)).to(x.dtype)


def _blocks_reference(x: torch.Tensor, p: int) -> torch.Tensor:
    """Each contiguous run of ``p`` entries of the last dimension times ``H_p``."""
    n = x.shape[-1]
    return fwht_reference(x.reshape(*x.shape[:-1], n // p, p)).reshape(x.shape)


_OP = register_op(Op("hadamard_blocks", _blocks_reference, "hadamard:hadamard_blocks",
                     "power-of-two Hadamard transform of each contiguous block of the last dimension"))


def _check(x: torch.Tensor, signs: torch.Tensor | None, mixer: torch.Tensor | None, block: int | None
           ) -> tuple[int, int, int]:
    n = x.shape[-1]
    b = n if block is None else block
    if b <= 0 or n % b:
        raise ValueError(f"hadamard_transform: block {b} does not divide the last dimension {n}")
    m, p = split_size(b)
    if m > 1 and mixer is None:
        raise ValueError(f"hadamard_transform: block {b} = {m} x {p} is not a power of two; pass an orthogonal "
                         f"({m}, {m}) mixer (random_hadamard builds one)")
    if mixer is not None and tuple(mixer.shape) != (m, m):
        raise ValueError(f"hadamard_transform: mixer has shape {tuple(mixer.shape)}, expected ({m}, {m}) for "
                         f"block {b} = {m} x {p}")
    if signs is not None and tuple(signs.shape) != (n,):
        raise ValueError(f"hadamard_transform: signs has shape {tuple(signs.shape)}, expected ({n},)")
    return b, m, p


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None, mixer: torch.Tensor | None = None,
                       block: int | None = None) -> torch.Tensor:
    """``x @ T`` along the last dimension, ``T`` as in the module doc; same shape and dtype as ``x``."""
    n = x.shape[-1]
    b, m, p = _check(x, signs, mixer, block)
    y = x if signs is None else x * signs.to(x.device, x.dtype)
    y = _OP(y.contiguous(), p, device=x.device)
    if m > 1:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        yb = y.reshape(*x.shape[:-1], n // b, m, p).to(dt)
        y = torch.einsum("ij,...ik->...jk", mixer.to(x.device, dt), yb).reshape(x.shape).to(x.dtype)
    return y


def hadamard_transform_reference(x: torch.Tensor, signs: torch.Tensor | None = None,
                                 mixer: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """The same transform as an explicit float64 matrix product (``T`` built densely): ground truth."""
    return (x.to(torch.float64) @ hadamard_matrix_of(x.shape[-1], signs, mixer, block)).to(x.dtype)


def hadamard_matrix_of(n: int, signs: torch.Tensor | None = None, mixer: torch.Tensor | None = None,
                       block: int | None = None) -> torch.Tensor:
    """The dense float64 (n, n) ``T`` of :func:`hadamard_transform`."""
    b, m, p = _check(torch.empty(0, n), signs, mixer, block)
    t = hadamard_matrix(p)
    if m > 1:
        t = torch.kron(mixer.to(torch.float64).contiguous(), t)
    t = torch.block_diag(*([t] * (n // b)))
    if signs is not None:
        t = signs.to(torch.float64)[:, None] * t
    return t


@dataclasses.dataclass
class RandomHadamard:
    """A seeded random Hadamard transform of size ``n`` (``signs``, ``mixer``, ``block``)."""

    signs: torch.Tensor
    mixer: torch.Tensor | None
    block: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.signs, self.mixer, self.block)

    def transpose(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T^T`` along the last dimension (the inverse transform)."""
        return hadamard_transform_transposed(x, self.signs, self.mixer, self.block)


def hadamard_transform_transposed(x: torch.Tensor, signs: torch.Tensor | None = None,
                                  mixer: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """``x @ T^T`` (T's inverse): the mixer transposed, the Hadamard part (symmetric), then the signs."""
    y = hadamard_transform(x, None, None if mixer is None else mixer.T.contiguous(), block)
    return y if signs is None else y * signs.to(x.device, x.dtype)


def random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random (m, m) orthogonal matrix (QR of a Gaussian matrix, signs fixed), float64."""
    a = torch.randn(m, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def random_hadamard(n: int, seed: int = 0, block: int | None = None) -> RandomHadamard:
    """Seeded random signs (n,) and, when the block is not a power of two, a random orthogonal mixer
    for its odd factor (e.g. n = 576: a 9 x 9 mixer with a 64-Hadamard)."""
    b = n if block is None else block
    if n % b:
        raise ValueError(f"random_hadamard: block {b} does not divide {n}")
    m, _ = split_size(b)
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)
    mixer = random_orthogonal(m, g) if m > 1 else None
    return RandomHadamard(signs, mixer, b)

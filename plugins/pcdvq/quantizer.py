"""PCDVQ quantize / dequantize of one weight matrix (leaf math: torch and overdrive.kernels only).

For a weight ``W`` (N out, K in):

1. rotate its input dimension with a seeded randomized Hadamard ``T`` (overdrive.kernels.hadamard:
   signs, block-diagonal blocks of ``cfg.hadamard_block``): ``W' = W T`` (rows as vectors), so
   ``x W^T = (x T) W'^T``;
2. split each row of ``W'`` into K/8 vectors ``v`` of 8 entries; ``s0[n]`` = RMS of row n;
3. direction code = argmax over the codebook of ``<v, c>`` (= the largest cosine; chunked matmul);
4. magnitude code = the Lloyd–Max χ(8) cell of ``|v| / s0[n]``;
5. per-row scale refit by least squares given the codes: ``s[n] = <W'_n, U_n> / <U_n, U_n>`` with
   ``U`` the unscaled reconstruction ``level[m] * c[d]``.

Dequantized: ``W'[n, 8j:8j+8] = s[n] * level[mag[n, j]] * codebook[dir[n, j]]``, and ``W = W' T^T``.

Stored tensors (docs/methods/pcdvq.md): ``dir_codes`` int16 (N, K/8) holding the unsigned k-bit code's
bit pattern; ``mag_codes`` uint8 (N, K/8 * magnitude_bits / 8), 8/magnitude_bits codes per byte, code
``j`` of a byte at bits ``[mb*j, mb*(j+1))``; ``scales`` float32 (N,); ``hadamard_signs`` int8 (K,) of +-1.
"""
from __future__ import annotations

import torch

from overdrive.kernels.hadamard import hadamard_transform, hadamard_transform_transposed, random_orthogonal, split_size

from .codebook import DIM, direction_codebook, lloyd_max_chi, nearest
from .config import PCDVQConfig


def layer_signs(k: int, seed: int) -> torch.Tensor:
    """Seeded +-1 signs (k,) int8 for layers with ``k`` input features. Every layer with the same input
    size gets the same signs, so layers an engine fuses (q/k/v, gate/up: one input) share one set."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + k) & 0x7FFFFFFF)
    return (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.int8)


def hadamard_mixer(cfg: PCDVQConfig) -> torch.Tensor | None:
    """The orthogonal (m, m) float64 mixer of a non-power-of-two block ``m * 2^j`` (None for powers of
    two); seeded by ``cfg.seed`` only, so every layer and shard rebuilds the same one."""
    m, _ = split_size(cfg.hadamard_block)
    return random_orthogonal(m, torch.Generator().manual_seed(cfg.seed)) if m > 1 else None


def rotate(w: torch.Tensor, signs: torch.Tensor, cfg: PCDVQConfig, mixer: torch.Tensor | None = None) -> torch.Tensor:
    """``w T`` along the last dimension."""
    mixer = hadamard_mixer(cfg) if mixer is None else mixer
    return hadamard_transform(w, signs.to(w.dtype), None if mixer is None else mixer.to(w.dtype), cfg.hadamard_block)


def unrotate(w: torch.Tensor, signs: torch.Tensor, cfg: PCDVQConfig, mixer: torch.Tensor | None = None) -> torch.Tensor:
    """``w T^T`` along the last dimension (the inverse of :func:`rotate`)."""
    mixer = hadamard_mixer(cfg) if mixer is None else mixer
    return hadamard_transform_transposed(w, signs.to(w.dtype), None if mixer is None else mixer.to(w.dtype),
                                         cfg.hadamard_block)


def check_shape(name: str, shape: tuple[int, ...], cfg: PCDVQConfig) -> None:
    from overdrive.config import ConfigError

    k = shape[-1]
    if k % cfg.hadamard_block:
        raise ConfigError(f"tensor {name!r} {tuple(shape)}: {k} input features are not a multiple of the Hadamard "
                          f"block {cfg.hadamard_block} (--hadamard-block)")
    if k % (DIM * cfg.mags_per_byte):
        raise ConfigError(f"tensor {name!r} {tuple(shape)}: {k} input features are not a multiple of "
                          f"{DIM * cfg.mags_per_byte} (8-dim vectors, {cfg.mags_per_byte} magnitude codes per byte)")


def assign(v: torch.Tensor, codebook: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """Index of the largest ``<v, c>`` for each row of ``v`` (V, 8) over ``codebook`` (C, 8): the exact
    float64 argmax, via float32 scores on ``device`` and a float64 re-check of near-ties
    (:func:`overdrive.pcdvq.codebook.nearest`)."""
    return nearest(v, codebook, device)


def pack_mags(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, V) codes < 2**bits -> (N, V*bits/8) uint8, code j of a byte at bits [bits*j, bits*(j+1))."""
    per = 8 // bits
    c = codes.to(torch.int32).reshape(codes.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_mags(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(packed.shape[0], -1)


def dir_to_int16(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32)
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)


def dir_from_int16(stored: torch.Tensor) -> torch.Tensor:
    return stored.to(torch.int32) & 0xFFFF


def quantize_weight(name: str, w: torch.Tensor, cfg: PCDVQConfig, codebook: torch.Tensor | None = None,
                    device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors (without the layer prefix) of ``w`` (N, K); float64 math (the direction
    argmax scored on ``device``, default CPU, with the float64 result)."""
    check_shape(name, tuple(w.shape), cfg)
    cb = direction_codebook(cfg.direction_bits, cfg.codebook_samples, cfg.seed) if codebook is None else codebook
    levels, bounds = lloyd_max_chi(cfg.magnitude_bits)
    n, k = w.shape
    signs = layer_signs(k, cfg.seed)
    wr = rotate(w.to(torch.float64), signs, cfg)
    s0 = wr.pow(2).mean(1).sqrt().clamp_min(1e-30)
    v = wr.reshape(-1, DIM)
    d = assign(v, cb.double(), device)
    r = v.norm(dim=1) / s0.repeat_interleave(k // DIM)
    m = torch.bucketize(r, torch.from_numpy(bounds))
    u = (torch.from_numpy(levels)[m][:, None] * cb.double()[d]).reshape(n, k)
    s = (wr * u).sum(1) / (u * u).sum(1).clamp_min(1e-300)
    return {"dir_codes": dir_to_int16(d.reshape(n, k // DIM)),
            "mag_codes": pack_mags(m.reshape(n, k // DIM), cfg.magnitude_bits),
            "scales": s.to(torch.float32),
            "hadamard_signs": signs}


def dequantize_rotated(dir_codes: torch.Tensor, mag_codes: torch.Tensor, scales: torch.Tensor, cfg: PCDVQConfig,
                       codebook: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W' = W T`` (N, K) from the codes, in ``dtype``."""
    levels, _ = lloyd_max_chi(cfg.magnitude_bits)
    d = dir_from_int16(dir_codes).long()
    m = unpack_mags(mag_codes, cfg.magnitude_bits).long()
    lv = torch.from_numpy(levels).to(dtype)
    vec = codebook.to(dtype)[d] * lv[m][..., None]  # (N, K/8, 8)
    return vec.reshape(d.shape[0], -1) * scales.to(dtype)[:, None]


def dequantize_weight(t: dict[str, torch.Tensor], cfg: PCDVQConfig, codebook: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W`` (N, K) from the stored tensors of :func:`quantize_weight`."""
    wr = dequantize_rotated(t["dir_codes"], t["mag_codes"], t["scales"], cfg, codebook, dtype)
    return unrotate(wr, t["hadamard_signs"], cfg)

"""Triton 3/4-bit group-asymmetric GEMV/GEMM on the kernel layout (overdrive.kernels.group_linear).

Layout: codes packed along K with N contiguous (``qweight_kn`` (Kw, N)), ``scales_kn`` / ``szeros_kn``
(K/g, N) with the zero point pre-multiplied, so a weight is ``code * scale - szero``.

* M = 1: :func:`_gemv_kernel`, many small programs over (N tiles x K splits); each dequantizes a
  (BK, BN) tile and reduces ``x[:, None] * w`` with ``tl.sum`` over K (no tensor cores: a GEMV is
  bound by the weight bytes). With SPLIT_K > 1 the partial sums go to an fp32 buffer by atomic adds.
* M > 1: :func:`_gemm_kernel`, (BM, BK) x (BK, BN) ``tl.dot`` tiles in the activation dtype (fp32:
  IEEE), split-K the same way for small M.

Configs: on CUDA each (M bucket, N, K, dtype, bits) is timed once over a small candidate list and the
fastest kept in a process-wide cache (:data:`TUNED`); in Triton's interpreter the first candidate
runs (tests pass explicit configs to cover the others).
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from . import as_2d_with_output


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, k_first, rn, n_ok, K, N,
                  BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                  BK: tl.constexpr, BN: tl.constexpr):
    """(BK, BN) float32 weights W^T[k_first + i, rn] = code * scale - szero (0 past K); ``k_first`` is a
    multiple of BK and of 32 (split and tile starts)."""
    kk = k_first + tl.arange(0, BK)
    k_ok = kk < K
    mask2 = k_ok[:, None] & n_ok[None, :]
    if BITS == 4:
        # each word holds 8 consecutive k: load the (BK/8, BN) words once and expand them in registers
        kw = k_first // 8 + tl.arange(0, BK // 8)
        words = tl.load(q_ptr + kw[:, None] * N + rn[None, :], mask=(kw[:, None] * 8 < K) & n_ok[None, :],
                        other=0).to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, 8) * 4).to(tl.uint32)
        v = tl.reshape(words[:, None, :] >> shifts[None, :, None], (BK, BN))
    else:
        pos = BITS * (kk % G)
        word = (kk // G) * W + pos // 32
        sh = (pos % 32).to(tl.uint32)
        lo = tl.load(q_ptr + word[:, None] * N + rn[None, :], mask=mask2, other=0).to(tl.uint32, bitcast=True)
        v = lo >> sh[:, None]
        # codes 10 and 21 of each 32-code group straddle two words
        straddle = (pos % 32 + BITS) > 32
        hi = tl.load(q_ptr + (word[:, None] + 1) * N + rn[None, :], mask=mask2 & straddle[:, None],
                     other=0).to(tl.uint32, bitcast=True)
        v = tl.where(straddle[:, None], v | (hi << (32 - sh)[:, None]), v)
    code = (v & ((1 << BITS) - 1)).to(tl.float32)
    if GROUP % BK == 0:  # the tile lies in one quantization group: one row of scales / zeros
        off = (k_first // GROUP) * N + rn
        s = tl.load(s_ptr + off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        off = (kk // GROUP)[:, None] * N + rn[None, :]
        s = tl.load(s_ptr + off, mask=mask2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + off, mask=mask2, other=0.0).to(tl.float32)
    return tl.where(mask2, code * s - z, 0.0)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, K_PER_SPLIT, sxk,
                 BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BK):
        kk = k_start + k0 + tl.arange(0, BK)
        k_ok = kk < K
        x = tl.load(x_ptr + kk * sxk, mask=k_ok, other=0.0).to(tl.float32)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, k_start + k0, rn, n_ok, K, N, BITS, G, W, GROUP, BK, BN)
        acc += tl.sum(x[:, None] * w, axis=0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)
    if SPLIT_K == 1:
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(y_ptr + rn, acc, mask=n_ok)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT, sxm, sxk, sym, syn,
                 BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BK):
        kk = k_start + k0 + tl.arange(0, BK)
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, k_start + k0, rn, n_ok, K, N, BITS, G, W, GROUP, BK, BN)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    ptrs = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration (BM = 1 selects the GEMV kernel)."""

    bm: int
    bn: int
    bk: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (1, 2, 4, ..., 64), then 128, 256, ... : the tuning key."""
    return 1 << max(0, math.ceil(math.log2(max(m, 1))))


def candidates(m: int, n: int, k: int) -> list[Config]:
    """Configs tried for an M bucket (the first is the default, also used in the interpreter)."""
    mb = m_bucket(m)
    if mb == 1:
        return [Config(1, bn, bk, sk, nw) for bn, bk, sk, nw in
                ((64, 64, 4, 4), (128, 32, 8, 4), (64, 128, 2, 4), (32, 128, 8, 2), (128, 64, 4, 4),
                 (64, 64, 16, 4), (256, 32, 4, 8), (32, 64, 1, 2))]
    if mb <= 64:
        bm = max(16, mb)
        return [Config(bm, bn, bk, sk, nw, ns) for bn, bk, sk, nw, ns in
                ((64, 64, 4, 4, 3), (128, 64, 2, 4, 3), (64, 128, 8, 4, 3), (128, 32, 4, 4, 4), (64, 64, 1, 4, 3),
                 (256, 64, 1, 8, 3))]
    return [Config(bm, bn, bk, 1, nw, ns) for bm, bn, bk, nw, ns in
            ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4),
             (128, 64, 32, 4, 4))]


#: (M bucket, N, K, x dtype, bits, group, device) -> the fastest Config measured in this process
TUNED: dict[tuple, Config] = {}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(cfg: Config, x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
            bias: torch.Tensor | None, y: torch.Tensor, bits: int, group_size: int) -> None:
    M, K = x2.shape
    N = q.shape[1]
    lcm = math.lcm(bits, 32)
    g, w = lcm // bits, lcm // 32
    # every split but the last covers a whole number of BK tiles (and of 32-code packing groups)
    k_per = -(-K // cfg.split_k)
    k_per = -(-k_per // max(cfg.bk, 32)) * max(cfg.bk, 32)
    split = -(-K // k_per)
    target = y if split == 1 else torch.zeros(M, N, dtype=torch.float32, device=y.device)
    b = bias if bias is not None else s
    meta = dict(BITS=bits, G=g, W=w, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.bm == 1:
        for row in range(M):  # M = 1 in practice; rows of a GEMV config run one after another
            yr = target[row]
            _gemv_kernel[(triton.cdiv(N, cfg.bn), split)](x2[row], q, s, z, b, yr, N, K, k_per, x2.stride(1),
                                                          BN=cfg.bn, BK=cfg.bk, **meta)
    else:
        grid = (triton.cdiv(M, cfg.bm), triton.cdiv(N, cfg.bn), split)
        _gemm_kernel[grid](x2, q, s, z, b, target, M, N, K, k_per, x2.stride(0), x2.stride(1),
                           target.stride(0), target.stride(1), BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, **meta)
    if target is not y:
        y.copy_(target)


def _tuned(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None,
           y: torch.Tensor, bits: int, group_size: int) -> Config:
    M, K = x2.shape
    N = q.shape[1]
    cands = candidates(M, N, K)
    if _interpreted() or x2.device.type != "cuda":
        return cands[0]
    key = (m_bucket(M), N, K, x2.dtype, bits, group_size, x2.device.index)
    if key not in TUNED:
        from triton.testing import do_bench

        best, best_t = cands[0], math.inf
        for c in cands:
            try:
                t = do_bench(lambda c=c: _launch(c, x2, q, s, z, bias, y, bits, group_size), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config the device cannot run (shared memory, ...)
                continue
            if t < best_t:
                best, best_t = c, t
        TUNED[key] = best
    return TUNED[key]


def group_linear_kn(x: torch.Tensor, qweight_kn: torch.Tensor, scales_kn: torch.Tensor, szeros_kn: torch.Tensor,
                    bits: int, group_size: int, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    config: Config | None = None) -> torch.Tensor:
    N = qweight_kn.shape[1]
    x2, y = as_2d_with_output(x, N, out)
    if x2.shape[0] and N:
        q, s, z = qweight_kn.contiguous(), scales_kn.contiguous(), szeros_kn.contiguous()
        cfg = config or _tuned(x2, q, s, z, bias, y, bits, group_size)
        _launch(cfg, x2, q, s, z, bias, y, bits, group_size)
    return y.reshape(*x.shape[:-1], N)


def group_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group_size: int, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Checkpoint layout: prepared per call (serving code prepares once, see prepare_group_weight)."""
    from ..group_linear import prepare_group_weight

    p = prepare_group_weight(qweight, scales, zeros, bits, group_size)
    return group_linear_kn(x, p["qweight_kn"], p["scales_kn"], p["szeros_kn"], bits, group_size, bias, out)

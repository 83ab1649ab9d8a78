"""overdrive.kernels: Triton kernels with torch references and per-call dispatch.

Importing this package imports no Triton and initialises no CUDA (see :mod:`.dispatch`).
"""
from .act8_linear import act8_linear, act8_linear_reference
from .dispatch import ENV, MODES, active_backend, backend_for, get_op, list_ops, mode
from .group_linear import (dequantize_kn_reference, dequantize_reference, group_linear, group_linear_kn,
                           group_linear_kn_reference, group_linear_reference, prepare_group_weight)
from .hadamard import (RandomHadamard, hadamard_matrix, hadamard_transform, hadamard_transform_reference,
                       hadamard_transform_transposed, random_hadamard)
from .int8_linear import int8_weight_linear, int8_weight_linear_reference
from .window_attention import attention_flops, window_attention, window_attention_reference
from .kv_quant import kv_dequantize, kv_quantize, kv_quantize_reference, kv_requantize, kv_requantize_reference
from .packing import group_shape, pack, pack_reference, packed_length, unpack, unpack_reference

__all__ = [
    "act8_linear", "act8_linear_reference", "RandomHadamard", "hadamard_matrix", "hadamard_transform",
    "hadamard_transform_reference", "hadamard_transform_transposed", "random_hadamard",
    "ENV", "MODES", "active_backend", "backend_for", "dequantize_kn_reference", "dequantize_reference", "get_op",
    "group_linear", "group_linear_kn", "group_linear_kn_reference", "group_linear_reference", "prepare_group_weight", "group_shape", "int8_weight_linear",
    "int8_weight_linear_reference", "list_ops", "mode", "pack", "pack_reference", "packed_length", "unpack",
    "unpack_reference", "kv_dequantize", "kv_quantize", "kv_quantize_reference", "kv_requantize",
    "kv_requantize_reference", "attention_flops", "window_attention", "window_attention_reference",
]

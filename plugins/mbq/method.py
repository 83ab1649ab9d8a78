"""MBQ's runtime: the weight-quantization contract over overdrive's kernels.

W4A8/W8A8 layers hold ``P.qweight`` (int8 (N, K), or int4 codes + 8 packed 8 per int32 word) and
``P.scales`` (N,) and run overdrive.kernels.act8_linear. Weight-only W3/W4 tensors per quantized
linear layer ``P`` (docs/methods/mbq.md):

===============  =========================  ===========================================================
``P.qweight``    int32 (N, ceil(K/G)*W)     unsigned ``bits``-bit codes along K, packed as in
                                            overdrive.kernels.packing (3-bit: 32 codes in 3 words)
``P.scales``     float16 (N, K/group)       per-group scale
``P.zeros``      uint8 (N, K/group)         per-group zero point (a code)
===============  =========================  ===========================================================

``W[n, k] = (code[n, k] - zeros[n, k // group]) * scales[n, k // group]``.

At load time :meth:`MBQMethod.process_after_loading` turns the tensors into the layout of the kernel
that will run them (overdrive.kernels.prepare_group_linear / prepare_act8_linear: on CPU in bf16/fp16
torch's packed int4/int8 CPU GEMMs, otherwise the Triton layout); ``apply`` runs it. Engine adapters
may instead hand a layer to the engine's own kernel: :meth:`MBQMethod.weight_format` declares the format
in neutral terms and :meth:`MBQMethod.standard_weight` unpacks the checkpoint tensors for the repack.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.weight_quant import (ACT_DTYPE, ParamSpec, StandardWeight, WeightFormat, WeightQuantMethod,
                                              check_quant_method)
from overdrive.kernels import (act8_linear_prepared, group_linear_prepared, hadamard_transform, packed_length,
                               prepare_act8_linear, prepare_group_linear, unpack)

from .config import MBQConfig

NAME = "mbq"


class MBQMethod(WeightQuantMethod):
    def config_from_checkpoint(self, quantization_config: Mapping[str, Any]) -> MBQConfig:
        check_quant_method(quantization_config, NAME)
        data = {k: v for k, v in quantization_config.items() if k != "quant_method"}
        return MBQConfig.from_dict(data, source="config.json quantization_config")

    def is_quantized_layer(self, prefix: str, cfg: MBQConfig) -> bool:
        return not any(s in prefix for s in cfg.modules_to_not_convert)

    def layer_config(self, prefix: str, cfg: MBQConfig) -> MBQConfig:
        """Rotated checkpoints (``rotation: "full"``): only ``down_proj`` layers keep ``online_hadamard``
        (their inputs are rotated at run time); every other layer runs without it."""
        if cfg.online_hadamard and not prefix.endswith("down_proj"):
            return dataclasses.replace(cfg, rotation="residual", online_hadamard=0)
        return cfg

    def validate_partition(self, in_features: int, out_features: list[int], cfg: MBQConfig, prefix: str = "") -> None:
        if cfg.online_hadamard and in_features % cfg.online_hadamard:
            raise ConfigError(f"MBQ layer {prefix or '?'}: {in_features} input features per tensor-parallel shard is "
                              f"not a multiple of the online Hadamard block {cfg.online_hadamard} the checkpoint was "
                              "rotated with; use a smaller tensor-parallel size")
        if cfg.act_bits == 8:
            if cfg.bits == 4 and in_features % 8:
                raise ConfigError(f"MBQ W4A8 layer {prefix or '?'}: {in_features} input features per tensor-parallel "
                                  "shard is not a multiple of 8 (8 int4 codes per packed word)")
            return
        if in_features % cfg.group_size:
            raise ConfigError(
                f"MBQ layer {prefix or '?'}: {in_features} input features per tensor-parallel shard is not a "
                f"multiple of the group size {cfg.group_size}, so a quantization group would straddle the shard "
                "boundary; use a smaller tensor-parallel size, or re-quantize with a --group-size that divides "
                "the per-shard input features")

    def param_specs(self, in_features: int, out_features: int, cfg: MBQConfig) -> list[ParamSpec]:
        if cfg.act_bits == 8:
            q = (ParamSpec("qweight", (out_features, in_features), torch.int8, output_dim=0, input_dim=1)
                 if cfg.bits == 8 else
                 ParamSpec("qweight", (out_features, packed_length(in_features, 4)), torch.int32,
                           output_dim=0, input_dim=1))
            return [q, ParamSpec("scales", (out_features,), ACT_DTYPE, output_dim=0)]
        groups = in_features // cfg.group_size
        return [
            ParamSpec("qweight", (out_features, packed_length(in_features, cfg.bits)), torch.int32,
                      output_dim=0, input_dim=1),
            ParamSpec("scales", (out_features, groups), ACT_DTYPE, output_dim=0, input_dim=1),
            ParamSpec("zeros", (out_features, groups), torch.uint8, output_dim=0, input_dim=1),
        ]

    def process_after_loading(self, params: dict[str, torch.Tensor], cfg: MBQConfig) -> dict[str, torch.Tensor]:
        if cfg.act_bits == 8:
            return prepare_act8_linear(params["qweight"], params["scales"], cfg.bits)
        return prepare_group_linear(params["qweight"], params["scales"], params["zeros"], cfg.bits, cfg.group_size)

    def apply(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], bias: torch.Tensor | None,
              cfg: MBQConfig) -> torch.Tensor:
        """``params``: what :meth:`process_after_loading` returned. Layers with an online Hadamard (rotated
        checkpoints) transform their input first."""
        if cfg.online_hadamard:
            x = hadamard_transform(x, block=cfg.online_hadamard)
        if cfg.act_bits == 8:
            return act8_linear_prepared(x, dict(params), cfg.bits, bias)
        return group_linear_prepared(x, dict(params), cfg.bits, cfg.group_size, bias)

    def weight_format(self, cfg: MBQConfig) -> WeightFormat | None:
        if cfg.online_hadamard:
            return None  # the input transform runs in apply: an engine's kernel would skip it
        if cfg.act_bits == 8:
            return WeightFormat(cfg.bits, None, zero_point=False, act_bits=8)
        return WeightFormat(cfg.bits, cfg.group_size, zero_point=True)

    def standard_weight(self, params: Mapping[str, torch.Tensor], cfg: MBQConfig) -> StandardWeight:
        q, s = params["qweight"], params["scales"]
        n = q.shape[0]
        if cfg.act_bits == 8:
            codes = q.to(torch.int32) if cfg.bits == 8 else unpack(q, 4, q.shape[1] * 8).to(torch.int32) - 8
            return StandardWeight(codes, s.reshape(n, 1))
        k = s.shape[1] * cfg.group_size
        return StandardWeight(unpack(q, cfg.bits, k).to(torch.int32), s, params["zeros"].to(torch.int32))


METHOD = MBQMethod()

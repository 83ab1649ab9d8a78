"""PCDVQ's runtime: the weight-quantization contract (torch dequant path).

Tensors per quantized linear layer ``P`` (N out, K in; docs/methods/pcdvq.md): ``P.dir_codes`` int16
(N, K/8), ``P.mag_codes`` uint8 (N, K/8 * magnitude_bits / 8), ``P.scales`` float32 (N,),
``P.hadamard_signs`` int8 (K,). All shard along outputs; codes and signs along inputs too, and
:meth:`PCDVQMethod.validate_partition` refuses a shard whose input features are not whole Hadamard
blocks.

``apply`` rotates the activations (``x T``, overdrive.kernels.hadamard), then multiplies by the rotated
weight ``W' = W T``: on CUDA the codes stay codes and overdrive.kernels.vq_linear (Triton) decodes them
inside the GEMV/GEMM; on CPU ``W'`` is decoded once at load time (float32) and multiplied densely.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.weight_quant import ParamSpec, WeightQuantMethod, check_quant_method

from overdrive.kernels import vq_linear

from .codebook import lloyd_max_chi
from .config import PCDVQConfig
from .quantizer import dequantize_rotated, dir_from_int16, hadamard_mixer, rotate, unpack_mags
from .runtime import load_codebook

NAME = "pcdvq"


class PCDVQMethod(WeightQuantMethod):
    def config_from_checkpoint(self, quantization_config: Mapping[str, Any]) -> PCDVQConfig:
        check_quant_method(quantization_config, NAME)
        data = {k: v for k, v in quantization_config.items() if k != "quant_method"}
        return PCDVQConfig.from_dict(data, source="config.json quantization_config")

    def is_quantized_layer(self, prefix: str, cfg: PCDVQConfig) -> bool:
        return not any(s in prefix for s in cfg.modules_to_not_convert)

    def validate_partition(self, in_features: int, out_features: list[int], cfg: PCDVQConfig, prefix: str = "") -> None:
        if in_features % cfg.hadamard_block or in_features % (8 * cfg.mags_per_byte):
            raise ConfigError(
                f"PCDVQ layer {prefix or '?'}: {in_features} input features per tensor-parallel shard is not a "
                f"multiple of the Hadamard block {cfg.hadamard_block} (and of {8 * cfg.mags_per_byte}), so a "
                "Hadamard block would straddle the shard boundary; use a smaller tensor-parallel size or "
                "re-quantize with a --hadamard-block dividing the per-shard input features")

    def param_specs(self, in_features: int, out_features: int, cfg: PCDVQConfig) -> list[ParamSpec]:
        v = in_features // 8
        return [
            ParamSpec("dir_codes", (out_features, v), torch.int16, output_dim=0, input_dim=1),
            ParamSpec("mag_codes", (out_features, v // cfg.mags_per_byte), torch.uint8, output_dim=0, input_dim=1),
            ParamSpec("scales", (out_features,), torch.float32, output_dim=0),
            ParamSpec("hadamard_signs", (in_features,), torch.int8, input_dim=0),
        ]

    def process_after_loading(self, params: dict[str, torch.Tensor], cfg: PCDVQConfig) -> dict[str, torch.Tensor]:
        cb = load_codebook(cfg)
        dev = params["scales"].device
        if dev.type == "cuda":  # keep the codes: overdrive.kernels.vq_linear decodes them in the GEMV/GEMM
            levels = torch.from_numpy(lloyd_max_chi(cfg.magnitude_bits)[0]).float()
            return {"dir_codes": dir_from_int16(params["dir_codes"]).contiguous(),
                    "mag_codes": unpack_mags(params["mag_codes"], cfg.magnitude_bits).contiguous(),
                    "scales": params["scales"].float(), "codebook": cb.to(dev), "levels": levels.to(dev),
                    "hadamard_signs": params["hadamard_signs"]}
        # CPU: decode once (float32) and multiply densely
        w = dequantize_rotated(params["dir_codes"], params["mag_codes"], params["scales"], cfg, cb, torch.float32)
        return {"weight_rot": w, "hadamard_signs": params["hadamard_signs"]}

    def apply(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], bias: torch.Tensor | None,
              cfg: PCDVQConfig) -> torch.Tensor:
        xr = rotate(x, params["hadamard_signs"], cfg, hadamard_mixer(cfg))
        if "weight_rot" in params:
            y = torch.nn.functional.linear(xr, params["weight_rot"].to(x.dtype))
        else:
            y = vq_linear(xr, params["dir_codes"], params["mag_codes"], params["scales"], params["codebook"],
                          params["levels"])
        return y if bias is None else y + bias.to(y.dtype)


METHOD = PCDVQMethod()

"""The weight-quantization contract (kind ``weight_quantization``).

One implementation serves every engine: an adapter asks the method which parameters a linear layer
needs (:meth:`WeightQuantMethod.param_specs`), lets the engine's own weight loader fill them (shards
for tensor parallelism follow ``output_dim``/``input_dim``/``packed_dim``), calls
:meth:`process_after_loading` once, then :meth:`apply` for every forward. Plain torch tensors in and
out; kernels come from :mod:`overdrive.kernels`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence

import torch

from ..config import ConfigError, MethodConfig

#: ``ParamSpec.dtype`` value meaning "the model's activation dtype" (fp16/bf16/fp32, chosen by the engine).
ACT_DTYPE = "act"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of a quantized linear layer, as stored in the checkpoint (per TP partition).

    output_dim / input_dim  which tensor dim runs along the layer's output / input features, so the
                            engine can shard it for column- / row-parallel layers (None: replicated)
    packed_dim, packed_factor  a dim that stores ``packed_factor`` codes per element (e.g. 8 4-bit
                            codes per int32): the engine divides shard offsets along it by the factor
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str
    output_dim: int | None = None
    input_dim: int | None = None
    packed_dim: int | None = None
    packed_factor: int = 1

    def resolve_dtype(self, act_dtype: torch.dtype) -> torch.dtype:
        return act_dtype if self.dtype == ACT_DTYPE else self.dtype  # type: ignore[return-value]

    def weight_attrs(self) -> dict[str, Any]:
        """Attributes engine weight loaders (vLLM, SGLang) read from a parameter."""
        attrs: dict[str, Any] = {}
        if self.output_dim is not None:
            attrs["output_dim"] = self.output_dim
        if self.input_dim is not None:
            attrs["input_dim"] = self.input_dim
        if self.packed_dim is not None:
            attrs["packed_dim"] = self.packed_dim
            attrs["packed_factor"] = self.packed_factor
        return attrs


class WeightQuantMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach every weight-quant adapter."""

    #: activation dtypes the kernels accept
    act_dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16, torch.float32)
    #: minimum CUDA compute capability x10 (Triton needs Volta+ for most kernels)
    min_capability: int = 70
    #: config.json files besides ``quantization_config`` that may hold the method's config
    config_filenames: Sequence[str] = ()

    @abc.abstractmethod
    def config_from_checkpoint(self, quantization_config: Mapping[str, Any]) -> MethodConfig:
        """Parse ``quantization_config`` of a checkpoint's config.json; ConfigError when invalid."""

    def default_config(self) -> MethodConfig | None:
        """Config for quantize-on-load of an unquantized checkpoint; None if a checkpoint is required."""
        return None

    def is_quantized_layer(self, prefix: str, cfg: MethodConfig) -> bool:
        """Whether the linear layer at ``prefix`` (e.g. ``model.layers.0.mlp.down_proj``) is quantized."""
        return True

    def layer_config(self, prefix: str, cfg: MethodConfig) -> MethodConfig:
        """The config one layer (at ``prefix``) runs with; adapters call it once per layer, before
        :meth:`validate_partition`. Default: the checkpoint's config (per-layer variants, e.g. an input
        transform applied to some layers only, return a copy)."""
        return cfg

    def validate_partition(self, in_features: int, out_features: Sequence[int], cfg: MethodConfig,
                           prefix: str = "") -> None:
        """Reject a tensor-parallel partition the format cannot represent (raise ConfigError)."""

    @abc.abstractmethod
    def param_specs(self, in_features: int, out_features: int, cfg: MethodConfig) -> list[ParamSpec]:
        """Parameters of one (partition of a) linear layer with the given local sizes."""

    def process_after_loading(self, params: dict[str, torch.Tensor], cfg: MethodConfig) -> dict[str, torch.Tensor]:
        """Repack loaded parameters for the kernel; returns the tensors ``apply`` receives."""
        return params

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], bias: torch.Tensor | None,
              cfg: MethodConfig) -> torch.Tensor:
        """``y = x @ W.T + bias`` for the quantized ``W``; ``x`` is (..., in_features)."""


def check_quant_method(quantization_config: Mapping[str, Any], name: str, source: str = "quantization_config") -> None:
    """Shared check that a checkpoint's ``quant_method`` names this method."""
    found = quantization_config.get("quant_method")
    if found != name:
        raise ConfigError(f"{source}: quant_method is {found!r}, expected {name!r}")

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


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """A layer's quantized weights in engine-neutral terms, so an adapter can ask its engine for a kernel.

    bits        weight code width
    group_size  input channels per scale (and zero point); None: one scale per output channel
    zero_point  asymmetric: unsigned codes in [0, 2**bits) and a zero code per group,
                ``W = (code - zero) * scale``; otherwise symmetric signed codes, ``W = code * scale``
                with ``|code| <= 2**(bits-1) - 1``
    act_bits    16: weight-only; 8: activations quantized per token, dynamically, symmetrically to int8
                (``scale = max|x| / 127``, round half away from zero)
    """

    bits: int
    group_size: int | None
    zero_point: bool
    act_bits: int = 16

    @property
    def symmetric(self) -> bool:
        return not self.zero_point

    def describe(self) -> str:
        g = f" g{self.group_size}" if self.group_size else " per-channel"
        return f"W{self.bits}A{self.act_bits}{g} {'asymmetric' if self.zero_point else 'symmetric'}"


@dataclasses.dataclass
class StandardWeight:
    """One (partition of a) layer's weights in :class:`WeightFormat` terms, unpacked: what an adapter
    repacks into an engine kernel's layout.

    codes   int32 (N, K): unsigned with zero points, signed when symmetric
    scales  (N, K / group_size), or (N, 1) per channel; floating
    zeros   int32 (N, K / group_size) zero codes, or None when symmetric
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The float64 (N, K) weight (a reference for tests)."""
        k = self.codes.shape[1]
        rep = k // self.scales.shape[1]
        w = self.codes.to(torch.float64)
        if self.zeros is not None:
            w = w - self.zeros.to(torch.float64).repeat_interleave(rep, dim=1)
        return w * self.scales.to(torch.float64).repeat_interleave(rep, dim=1)


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
        """The config the linear layer at ``prefix`` runs with; adapters call it once per layer, before
        :meth:`validate_partition`, and use the result for every later call of that layer. Default: the
        checkpoint's config (a method whose layers differ, e.g. an input transform on some layers only,
        returns a per-layer copy)."""
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

    def weight_format(self, cfg: MethodConfig) -> WeightFormat | None:
        """The layers' format in neutral terms when it is a standard integer format an engine kernel may
        serve (adapters then call :meth:`standard_weight` and repack for that kernel); None: only this
        method's own :meth:`apply` computes it."""
        return None

    def standard_weight(self, params: Mapping[str, torch.Tensor], cfg: MethodConfig) -> StandardWeight:
        """The loaded checkpoint tensors (``param_specs`` names, before :meth:`process_after_loading`)
        as a :class:`StandardWeight`; required when :meth:`weight_format` is not None."""
        raise NotImplementedError(f"{type(self).__name__} declares a weight_format but no standard_weight")


class ExpertQuantMethod(abc.ABC):
    """Optional mix-in of a :class:`WeightQuantMethod` that also quantizes MoE experts, per expert.

    Adapters that see a MoE layer (transformers: the experts module of a sparse MoE block; vLLM: the
    fused-MoE layer) ask :meth:`expert_formats` whether the layer's experts are quantized, check the
    model against the plan (:meth:`check_moe_layer`), let the engine load the per-expert checkpoint
    tensors named by :meth:`expert_tensor_names` (``...experts.{e}.{proj}.{name}``), then hand them to
    :meth:`expert_runtime`, a torch module computing the routed experts from the engine's routing:
    ``forward(x (T, H), topk_weights (T, k), topk_ids (T, k)) -> (T, H)``.
    """

    @abc.abstractmethod
    def expert_formats(self, cfg: MethodConfig, layer: int) -> dict[int, dict[str, str]] | None:
        """{expert: {"gate"|"up"|"down": format name}} of MoE layer ``layer``; None: not quantized."""

    @abc.abstractmethod
    def check_moe_layer(self, cfg: MethodConfig, layer: int, num_experts: int, top_k: int, hidden: int,
                        intermediate: int, where: str) -> None:
        """Raise ConfigError when the model's MoE layer is not the one the plan was made for."""

    @abc.abstractmethod
    def expert_tensor_names(self, cfg: MethodConfig, layer: int, expert: int, linear: str) -> tuple[str, ...]:
        """Checkpoint tensor names (suffixes) of one expert linear."""

    @abc.abstractmethod
    def expert_runtime(self, cfg: MethodConfig, layer: int,
                       tensors: Mapping[int, Mapping[str, Mapping[str, torch.Tensor]]], hidden: int,
                       intermediate: int, dtype: torch.dtype, act_fn: Any) -> torch.nn.Module:
        """The layer's experts from their loaded tensors ``{expert: {linear: {name: tensor}}}``."""


def check_quant_method(quantization_config: Mapping[str, Any], name: str, source: str = "quantization_config") -> None:
    """Shared check that a checkpoint's ``quant_method`` names this method."""
    found = quantization_config.get("quant_method")
    if found != name:
        raise ConfigError(f"{source}: quant_method is {found!r}, expected {name!r}")

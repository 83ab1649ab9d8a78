"""The MxMoE method object (``METHOD``): a weight-quantization method whose MoE experts carry
per-expert formats (:class:`~overdrive.contracts.weight_quant.ExpertQuantMethod`).

Dense linear layers (attention, routers, shared experts, the LM head) stay in the checkpoint's dtype;
the experts of every MoE layer are loaded per expert and run by :class:`overdrive.mxmoe.runtime.MxMoEExperts`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.weight_quant import ExpertQuantMethod, ParamSpec, WeightQuantMethod, check_quant_method

from .config import LINEARS, MxMoEConfig, linear_shape, parse_format

NAME = "mxmoe"


class MxMoEMethod(WeightQuantMethod, ExpertQuantMethod):
    def config_from_checkpoint(self, quantization_config: Mapping[str, Any]) -> MxMoEConfig:
        check_quant_method(quantization_config, NAME)
        data = {k: v for k, v in quantization_config.items() if k != "quant_method"}
        return MxMoEConfig.from_dict(data, source="config.json quantization_config (mxmoe)")

    def is_quantized_layer(self, prefix: str, cfg: MxMoEConfig) -> bool:
        return False  # dense layers stay in the checkpoint's dtype

    def param_specs(self, in_features: int, out_features: int, cfg: MxMoEConfig) -> list[ParamSpec]:
        return []

    def apply(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], bias: torch.Tensor | None,
              cfg: MxMoEConfig) -> torch.Tensor:
        raise RuntimeError("mxmoe quantizes no dense linear layer")

    # -- experts ----------------------------------------------------------------------------
    def expert_formats(self, cfg: MxMoEConfig, layer: int) -> dict[int, dict[str, str]] | None:
        per = cfg.formats.get(str(layer), cfg.formats.get(layer))
        if per is None:
            return None
        return {int(e): dict(lin) for e, lin in per.items()}

    def check_moe_layer(self, cfg: MxMoEConfig, layer: int, num_experts: int, top_k: int, hidden: int,
                        intermediate: int, where: str) -> None:
        ident = cfg.identity
        model = {"num_experts": num_experts, "top_k": top_k, "hidden_size": hidden,
                 "expert_intermediate_size": intermediate}
        diff = [f"{k}: plan {ident[k]!r}, model {v!r}" for k, v in model.items() if int(ident[k]) != int(v)]
        if layer not in [int(l) for l in ident["moe_layers"]]:
            diff.append(f"MoE layer {layer}: the plan's MoE layers are {list(ident['moe_layers'])}")
        if diff:
            raise ConfigError(f"{where}: the mxmoe plan in config.json was made for another model "
                              f"({ident['architecture']}; {'; '.join(diff)})")

    def expert_tensor_names(self, cfg: MxMoEConfig, layer: int, expert: int, linear: str) -> tuple[str, ...]:
        from .quant import tensor_names

        return tensor_names(cfg.format_of(layer, expert, linear))

    def expert_param_specs(self, cfg: MxMoEConfig, layer: int, expert: int, linear: str) -> list[ParamSpec]:
        """Shapes/dtypes of one expert linear's checkpoint tensors (for engines that allocate before loading)."""
        from overdrive.kernels import packed_length

        fmt = cfg.format_of(layer, expert, linear)
        n, k = linear_shape(linear, int(cfg.identity["hidden_size"]), int(cfg.identity["expert_intermediate_size"]))
        if fmt.weight_only:
            g = k // fmt.group_size
            return [ParamSpec("qweight", (n, packed_length(k, fmt.bits)), torch.int32),
                    ParamSpec("scales", (n, g), torch.float16), ParamSpec("zeros", (n, g), torch.uint8)]
        q = (ParamSpec("qweight", (n, k), torch.int8) if fmt.bits == 8
             else ParamSpec("qweight", (n, packed_length(k, 4)), torch.int32))
        return [q, ParamSpec("scales", (n,), torch.float16)]

    def expert_runtime(self, cfg: MxMoEConfig, layer: int,
                       tensors: Mapping[int, Mapping[str, Mapping[str, torch.Tensor]]], hidden: int,
                       intermediate: int, dtype: torch.dtype, act_fn: Any) -> torch.nn.Module:
        from .quant import check_tensors
        from .runtime import MxMoEExperts

        experts = {}
        for e in range(int(cfg.identity["num_experts"])):
            experts[e] = {}
            for lin in LINEARS:
                fmt = cfg.format_of(layer, e, lin)
                n, k = linear_shape(lin, hidden, intermediate)
                t = dict(tensors.get(e, {}).get(lin, {}))
                check_tensors(t, fmt, n, k, f"layer {layer} expert {e} {lin}")
                experts[e][lin] = (fmt.name, t)
        kw = {"act_fn": act_fn} if act_fn is not None else {}
        return MxMoEExperts(experts, hidden, intermediate, dtype, **kw)

    @staticmethod
    def projection_names(architecture: str) -> dict[str, str]:
        from .config import projection_names

        return projection_names(architecture)

    def summary(self, cfg: MxMoEConfig) -> str:
        bits = [cfg.layer_bits(int(l)) for l in cfg.identity["moe_layers"]]
        return (f"{len(bits)} MoE layers, {sum(bits) / len(bits):.3f} bits per expert weight (budget {cfg.avg_bits}), "
                f"{cfg.quantizer}, r={cfg.r}; formats {cfg.histogram()}")


METHOD = MxMoEMethod()

__all__ = ["METHOD", "NAME", "MxMoEMethod", "parse_format"]

"""vLLM fused-MoE method for weight-quantization methods with per-expert formats
(:class:`~overdrive.contracts.weight_quant.ExpertQuantMethod`).

vLLM hands a MoE layer's experts to ``quant_config.get_quant_method(layer, prefix)``; for such a method
the generic config class (:mod:`overdrive.adapters._weight_quant`) returns :func:`moe_method`'s
``FusedMoEMethodBase`` subclass:

* ``create_weights`` checks the layer against the plan (experts, top-k, sizes, layer index) and registers
  one placeholder parameter per checkpoint tensor suffix the layer's formats use (``w13_qweight``,
  ``w13_scales``, ``w13_zeros``, ``w2_...``): vLLM's ``RoutedExperts.load_weights`` maps a checkpoint
  tensor ``experts.{e}.{gate|up|down}_proj.{name}`` (or ``w1/w3/w2``) to ``w13_{name}``/``w2_{name}`` with
  the expert id and shard id, and calls the placeholder's own ``weight_loader``, which keeps the tensor
  per (expert, linear) as stored (formats differ per expert, so no shared tensor layout exists);
* ``process_weights_after_loading`` checks every expert linear arrived and builds the method's expert
  runtime (experts grouped by format), then drops the placeholders;
* ``apply(layer, x, topk_weights, topk_ids, ...)`` runs that runtime on vLLM's routing decision (vLLM's
  router and shared experts are untouched; the runner adds the shared expert's output).

Only tensor- and expert-parallel size 1 (rejected at startup otherwise). Symbols: docs/ledger.md.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch

from overdrive.config import ConfigError

log = logging.getLogger("vllm.overdrive")  # a child of vLLM's logger: printed with vLLM's startup log
_SHARDS = {"w1": "gate", "w3": "up", "w2": "down"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_index(prefix: str) -> int:
    m = _LAYER.search(prefix)
    if not m:
        raise ConfigError(f"{prefix}: cannot tell the decoder layer index of this MoE layer")
    return int(m.group(1))


def moe_method(spec: Any, method: Any, cfg: Any, layer: torch.nn.Module, prefix: str) -> Any:
    """The fused-MoE method serving ``layer`` for an ExpertQuantMethod, or None when the plan leaves
    its experts unquantized."""
    index = _layer_index(prefix)
    if method.expert_formats(cfg, index) is None:
        return None
    return _method_class()(layer.moe_config, spec.name, method, cfg, index, prefix)


_cls: list[type] = []


def _method_class() -> type:
    if _cls:
        return _cls[0]
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.utils import set_weight_attrs

    class OverdriveExpertsMethod(FusedMoEMethodBase):
        def __init__(self, moe: Any, name: str, method: Any, cfg: Any, index: int, prefix: str) -> None:
            super().__init__(moe)
            self.name, self.method, self.cfg, self.index, self.prefix = name, method, cfg, index, prefix

        def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                           intermediate_size_per_partition: int, params_dtype: torch.dtype,
                           **extra_weight_attrs: Any) -> None:
            moe = self.moe
            par = moe.moe_parallel_config
            if getattr(par, "tp_size", 1) != 1 or getattr(par, "ep_size", 1) != 1:
                raise ConfigError(f"{self.prefix}: {self.name} serves MoE experts at tensor/expert-parallel size 1 "
                                  f"only (got tp {par.tp_size}, ep {par.ep_size})")
            if moe.activation != MoEActivation.SILU or not moe.is_act_and_mul:
                raise ConfigError(f"{self.prefix}: {self.name} experts run gated SiLU MLPs; this layer's activation "
                                  f"is {moe.activation}")
            self.method.check_moe_layer(self.cfg, self.index, num_experts, moe.experts_per_token, hidden_size,
                                        intermediate_size_per_partition, self.prefix)
            self.hidden, self.intermediate, self.dtype = hidden_size, intermediate_size_per_partition, params_dtype
            self.num_experts = num_experts
            names: dict[str, set[str]] = {"w13": set(), "w2": set()}
            for e in range(num_experts):
                for lin in ("gate", "up", "down"):
                    names["w2" if lin == "down" else "w13"].update(
                        self.method.expert_tensor_names(self.cfg, self.index, e, lin))
            store: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
            layer.overdrive_expert_tensors = store
            layer.overdrive_placeholders = []
            for stem, suffixes in names.items():
                for suffix in sorted(suffixes):
                    pname = f"{stem}_{suffix}"
                    p = torch.nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
                    layer.register_parameter(pname, p)
                    set_weight_attrs(p, {"weight_loader": self._loader(store, suffix)})
                    layer.overdrive_placeholders.append(pname)

        def _loader(self, store: dict, suffix: str) -> Any:
            where = self.prefix

            def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, weight_name: str = "",
                     shard_id: str = "", expert_id: int = -1, return_success: bool = False, **_: Any) -> Any:
                lin = _SHARDS.get(shard_id)
                if lin is None or not 0 <= int(expert_id) < self.num_experts:
                    raise ConfigError(f"{where}: checkpoint tensor {weight_name!r} (shard {shard_id!r}, expert "
                                      f"{expert_id}) is not an expert linear of this layer")
                store.setdefault((int(expert_id), lin), {})[suffix] = loaded_weight.detach().clone()
                return True if return_success else None

            return load

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            store = layer.overdrive_expert_tensors
            tensors: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
            for e in range(self.num_experts):
                for lin in ("gate", "up", "down"):
                    got = store.get((e, lin), {})
                    want = self.method.expert_tensor_names(self.cfg, self.index, e, lin)
                    missing = [n for n in want if n not in got]
                    if missing:
                        raise ConfigError(f"{self.prefix}: the checkpoint has no {', '.join(missing)} for expert {e} "
                                          f"{lin} (its {self.name} format needs {', '.join(want)})")
                    tensors.setdefault(e, {})[lin] = {n: got[n] for n in want}
            layer.overdrive_experts = self.method.expert_runtime(
                self.cfg, self.index, tensors, self.hidden, self.intermediate, self.dtype,
                torch.nn.functional.silu)
            groups = getattr(layer.overdrive_experts, "groups", lambda: {})()
            log.info("overdrive %s: %s experts in %d format groups %s (overdrive's runtime)", self.name,
                     self.prefix, len(groups), groups)
            for pname in layer.overdrive_placeholders:
                delattr(layer, pname)
            layer.overdrive_placeholders = []
            layer.overdrive_expert_tensors = {}

        def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> Any:
            return None

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_experts: Any = None, shared_experts_input: Any = None
                  ) -> torch.Tensor:
            return layer.overdrive_experts(x, topk_weights, topk_ids)

    OverdriveExpertsMethod.__qualname__ = OverdriveExpertsMethod.__name__
    _cls.append(OverdriveExpertsMethod)
    return OverdriveExpertsMethod

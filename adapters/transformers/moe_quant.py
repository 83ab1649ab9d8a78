"""Per-expert quantized MoE experts in transformers (:class:`~overdrive.contracts.weight_quant.ExpertQuantMethod`).

Before a checkpoint's weights load, :func:`swap_experts` replaces the ``experts`` module of every sparse
MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE: fused ``gate_up_proj``/``down_proj`` experts) by
:class:`QuantizedExperts`, whose sub-modules ``{e}.{proj}`` hold the per-expert checkpoint tensors
(``qweight``/``scales``/``zeros``) under the checkpoint's own names, so transformers' loader fills them
as stored. :func:`finish_experts` then builds the method's expert runtime from them. The router, the
shared expert and everything else are the model's own. :func:`moe_view` is the calibration side: the
block's router decision and expert weights, for per-expert calibrations.
"""
from __future__ import annotations

from typing import Any

import torch

from overdrive.config import ConfigError

LINEARS = ("gate", "up", "down")


def _sparse_block(module: torch.nn.Module) -> torch.nn.Module | None:
    mlp = getattr(module, "mlp", module)
    experts = getattr(mlp, "experts", None)
    if experts is not None and hasattr(mlp, "gate") and (hasattr(experts, "gate_up_proj")
                                                         or isinstance(experts, QuantizedExperts)):
        return mlp
    return None


class MoEView:
    """A transformers sparse MoE block seen framework-neutrally (calibration)."""

    def __init__(self, block: torch.nn.Module, renormalize: bool) -> None:
        self.block = block
        ex = block.experts
        e, two_i, h = ex.gate_up_proj.shape
        self.num_experts, self.hidden, self.intermediate = int(e), int(h), int(two_i // 2)
        self.top_k = int(block.gate.top_k)
        self.renormalize = renormalize
        self.shared_expert = hasattr(block, "shared_expert")
        self.act_fn = ex.act_fn

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's own router on (T, H) inputs: (weights (T, k), expert ids (T, k))."""
        _, w, idx = self.block.gate(x)
        return w, idx

    def weight(self, expert: int, linear: str) -> torch.Tensor:
        ex = self.block.experts
        i = self.intermediate
        if linear == "gate":
            return ex.gate_up_proj[expert, :i]
        if linear == "up":
            return ex.gate_up_proj[expert, i:]
        return ex.down_proj[expert]


def moe_view(layer: torch.nn.Module, config: Any = None) -> MoEView | None:
    """The view of a decoder layer's sparse MoE block, or None for a dense layer."""
    block = _sparse_block(layer)
    if block is None or isinstance(block.experts, QuantizedExperts):
        return None
    return MoEView(block, bool(getattr(config, "norm_topk_prob", True)) if config is not None else True)


class QuantizedExperts(torch.nn.Module):
    """Drop-in for a transformers experts module: ``forward(hidden, top_k_index, top_k_weights)``."""

    def __init__(self, method: Any, cfg: Any, layer: int, proj: dict[str, str], hidden: int, intermediate: int,
                 act_fn: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.method, self.cfg, self.layer, self.proj = method, cfg, layer, proj
        self.hidden, self.intermediate, self.act_fn, self.dtype = hidden, intermediate, act_fn, dtype
        self.num_experts = int(cfg.identity["num_experts"])
        for e in range(self.num_experts):
            mod = torch.nn.Module()
            for lin in LINEARS:
                sub = torch.nn.Module()
                for ps in method.expert_param_specs(cfg, layer, e, lin):
                    sub.register_parameter(ps.name, torch.nn.Parameter(torch.zeros(ps.shape, dtype=ps.dtype),
                                                                       requires_grad=False))
                mod.add_module(proj[lin], sub)
            self.add_module(str(e), mod)
        self.runtime: torch.nn.Module | None = None

    def finish_loading(self) -> None:
        tensors = {e: {lin: {n: p.data for n, p in getattr(getattr(self, str(e)), self.proj[lin]).named_parameters()}
                       for lin in LINEARS} for e in range(self.num_experts)}
        self.runtime = self.method.expert_runtime(self.cfg, self.layer, tensors, self.hidden, self.intermediate,
                                                  self.dtype, self.act_fn)
        for e in range(self.num_experts):  # the runtime holds what it computes with
            delattr(self, str(e))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        if self.runtime is None:
            raise RuntimeError(f"layer {self.layer}: quantized experts used before their weights were loaded")
        return self.runtime(hidden_states, top_k_weights, top_k_index)


def swap_experts(model: torch.nn.Module, method: Any, cfg: Any, dtype: torch.dtype) -> int:
    """Replace the experts of every MoE layer the plan quantizes; returns how many were swapped."""
    conf = model.config
    arch = (getattr(conf, "architectures", None) or [type(model).__name__])[0]
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: no decoder layers (model.model.layers)")
    moe = {i: _sparse_block(l) for i, l in enumerate(layers)}
    moe = {i: b for i, b in moe.items() if b is not None}
    ident = {"architecture": arch, "num_layers": int(conf.num_hidden_layers), "moe_layers": sorted(moe)}
    if moe:
        b = next(iter(moe.values()))
        e, two_i, h = b.experts.gate_up_proj.shape
        ident.update(num_experts=int(e), top_k=int(b.gate.top_k), hidden_size=int(h),
                     expert_intermediate_size=int(two_i // 2),
                     renormalize=bool(getattr(conf, "norm_topk_prob", True)),
                     shared_expert=hasattr(b, "shared_expert"))
    cfg.check_identity(ident, "config.json quantization_config")
    proj = method.projection_names(arch)
    n = 0
    for i, block in moe.items():
        if method.expert_formats(cfg, i) is None:
            continue
        ex = block.experts
        _, two_i, h = ex.gate_up_proj.shape
        block.experts = QuantizedExperts(method, cfg, i, proj, int(h), int(two_i // 2), ex.act_fn, dtype)
        n += 1
    return n


def finish_experts(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantizedExperts) and m.runtime is None:
            m.finish_loading()

"""Export a discrete EEP plan as a standard checkpoint of the same architecture with ``B`` experts.

When every route row is one-hot (new expert ``b`` routes as original expert ``e_b``) and the model
renormalises its top-k weights, the pruned model *is* a standard MoE model: the gate keeps rows
``e_b`` and expert ``b`` holds ``sum_e C[b, e] W_e`` (see :mod:`overdrive.contracts.expert_pruning`).
Stock vLLM, SGLang and transformers then serve it with no plugin. The checkpoint is streamed: one MoE
layer's experts are held at a time, and the output is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from overdrive.checkpoint import checkpoint_shards, rewrite_checkpoint
from overdrive.config import ConfigError
from overdrive.contracts.expert_pruning import merge_experts

from .config import EEPPlan, family_of


def export_checkpoint(model: Path, plan: EEPPlan, output: Path, allow_inexact: bool = False) -> Path:
    """Write ``output`` from ``model`` and ``plan``; ``ConfigError`` if the plan is not exactly a standard
    checkpoint (unless ``allow_inexact``: then the route's argmax rows are used and the result is an
    approximation, said in config.json)."""
    model, output = Path(model), Path(output)
    shards = checkpoint_shards(model)
    config = json.loads((model / "config.json").read_text())
    arch, fam = family_of(config, str(model / "config.json"))
    if arch != plan.identity.architecture:
        raise ConfigError(f"{model}: architecture {arch} but the plan was made for {plan.identity.architecture}")
    experts_key = fam.experts_key(config)
    if config.get(experts_key) != plan.identity.num_experts:
        raise ConfigError(f"{model}: {experts_key}={config.get(experts_key)} but the plan was made for "
                          f"{plan.identity.num_experts} experts")
    routes: dict[int, list[int]] = {}
    for layer, maps in plan.layers.items():
        kept = maps.kept_routes()
        if kept is None and not allow_inexact:
            raise ConfigError(
                f"plan layer {layer}: the route map is not one-hot, so no standard checkpoint reproduces it; serve it "
                "with overdrive's runtime (overdrive.transformers.enable(model, 'eep', plan=...)), or search with "
                "--freeze-route to keep the routes exportable")
        routes[layer] = kept if kept is not None else [int(i) for i in maps.route.argmax(dim=1)]
    if not plan.identity.renormalize and not allow_inexact:
        raise ConfigError(
            f"{model}: this model does not renormalise its top-k routing weights ({fam.renormalize_key}=false), so "
            "a checkpoint with fewer experts scales each token's expert output by its kept routing mass; the export "
            "is exact only for renormalising models. Use overdrive's runtime, or pass --allow-inexact")
    from safetensors import safe_open

    names: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
    need = [fam.gate_tensor(l) for l in plan.layers] + [fam.expert_tensor(l, e, p) for l in plan.layers
                                                         for e in range(plan.identity.num_experts)
                                                         for p in fam.projections]
    absent = [n for n in need if n not in names]
    if absent:
        raise ConfigError(f"{model}: checkpoint lacks {len(absent)} MoE tensor(s) the plan needs, e.g. {absent[0]}")
    b, k = plan.num_kept, plan.top_k
    per_layer = 3 * plan.identity.num_experts
    buffers: dict[int, dict[str, torch.Tensor]] = {}
    prefix = {layer: f"model.layers.{layer}.{fam.block}." for layer in plan.layers}

    def moe_layer(name: str) -> int | None:
        for layer, p in prefix.items():
            if name.startswith(p):
                return layer
        return None

    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        layer = moe_layer(name)
        if layer is None:
            return {name: t}
        if name == fam.gate_tensor(layer):
            if t.shape[0] != plan.identity.num_experts:
                raise ConfigError(f"{model}: {name} has {t.shape[0]} rows, expected {plan.identity.num_experts}")
            return {name: t[routes[layer]].contiguous()}
        if ".experts." not in name:
            return {name: t}  # shared expert, shared-expert gate: unchanged
        buf = buffers.setdefault(layer, {})
        buf[name] = t
        if len(buf) < per_layer:
            return {}
        out: dict[str, torch.Tensor] = {}
        maps = plan.layers[layer]
        for proj in fam.projections:
            try:
                stack = torch.stack([buf[fam.expert_tensor(layer, e, proj)] for e in range(plan.identity.num_experts)])
            except KeyError as e:
                raise ConfigError(f"{model}: layer {layer} lacks expert tensor {e}") from None
            merged = merge_experts(stack, maps.merge)
            for new in range(b):
                out[fam.expert_tensor(layer, new, proj)] = merged[new].contiguous()
        del buffers[layer]
        return out

    def update(conf: dict[str, Any]) -> dict[str, Any]:
        conf = dict(conf)
        conf[experts_key] = b
        conf[fam.top_k_key] = k
        conf["overdrive_expert_pruning"] = {"method": "eep", "kept_experts": b, "exact": plan.discrete,
                                            "source_experts": plan.identity.num_experts,
                                            "routes": {str(l): r for l, r in sorted(routes.items())}}
        return conf

    return rewrite_checkpoint(model, output, transform, None, desc="export", config_update=update)

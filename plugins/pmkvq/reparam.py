"""Fold PM-KVQ key scales into a transformers model during calibration: ``k_proj`` rows / s, ``q_proj`` rows * s.

(At inference the transformers adapter folds the formats' ``q_scale`` itself; both use
:func:`overdrive.contracts.kv_cache.fold_qk_scale`.)

K is then produced already divided by ``s`` (flatter per token, so per-token quantization loses
less) and q already multiplied by it, so q.k — and the model's function — is unchanged. Both
channels of a rotary pair share ``s`` (the plan checks it), so the scaling commutes with RoPE.
Attention modules are found by their ``layer_idx``, ``q_proj`` and ``k_proj`` attributes (Llama,
Qwen2, Mistral, ... in transformers). Folding is recorded on the model instance, so folding the same
plan twice is a no-op and folding a different one is an error.
"""
from __future__ import annotations

import hashlib
import json

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import ModelIdentity, attention_modules, fold_qk_scale

from .config import PMKVQPlan

_MARK = "_overdrive_pmkvq_scales"


def _digest(plan: PMKVQPlan) -> str:
    return hashlib.sha256(json.dumps([x.get("key_scale") for x in plan.layers]).encode()).hexdigest()


@torch.no_grad()
def fold_scales(model: torch.nn.Module, plan: PMKVQPlan) -> int:
    """Fold the plan's key scales into ``model``; returns how many layers changed."""
    ident = ModelIdentity.from_hf_config(model.config)
    plan.check_model(ident)
    digest = _digest(plan)
    done = getattr(model, _MARK, None)
    if done == digest:
        return 0
    if done is not None:
        raise ConfigError("this model already has another PM-KVQ plan's key scales folded in; load it afresh")
    mods = attention_modules(model)
    if sorted(mods) != list(range(ident.num_layers)):
        raise ConfigError(f"found attention modules for layers {sorted(mods)}, expected 0..{ident.num_layers - 1}")
    changed = 0
    for i, entry in enumerate(plan.layers):
        ks = entry.get("key_scale")
        if ks is None:
            continue
        attn = mods[i]
        fold_qk_scale(attn.q_proj, attn.k_proj, torch.tensor(ks, dtype=torch.float64))
        changed += 1
    setattr(model, _MARK, digest)
    return changed

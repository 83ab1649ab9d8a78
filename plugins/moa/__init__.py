"""MoA: per-head elastic sparse attention spans (kind ``kv_cache_attention``).

    import overdrive.transformers as odt
    cache = odt.kv_cache(model, "moa", plan="plan.json")     # switches the model's attention to span attention
    model.generate(ids, past_key_values=cache)               # a fresh cache per generate call

Plans come from ``overdrive calibrate --method moa``; engines read them through the KV-cache contract
(:mod:`overdrive.moa.method`). This module imports nothing heavy.
"""
from __future__ import annotations

from pathlib import Path

from .config import MoAPlan, make_plan, uniform_plan

__all__ = ["MoAPlan", "load_plan", "make_plan", "uniform_plan"]


def load_plan(path: str | Path) -> MoAPlan:
    return MoAPlan.load(path)

"""PM-KVQ: progressive mixed-precision KV-cache quantization (kind ``kv_cache_attention``).

    import overdrive.transformers as odt
    cache = odt.kv_cache(model, "pmkvq", plan="plan.json")   # folds the plan's key scales, returns a cache
    model.generate(ids, past_key_values=cache)               # a fresh cache per generate call

Plans come from ``overdrive calibrate --method pmkvq``; engines read them through the KV-cache
contract (:mod:`overdrive.pmkvq.method`). This module imports nothing heavy.
"""
from __future__ import annotations

from pathlib import Path

from .config import PMKVQPlan

__all__ = ["PMKVQPlan", "load_plan"]


def load_plan(path: str | Path) -> PMKVQPlan:
    return PMKVQPlan.load(path)

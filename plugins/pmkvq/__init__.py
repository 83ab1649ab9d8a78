"""PM-KVQ: progressive mixed-precision KV-cache quantization (kind ``kv_cache_attention``).

    import overdrive.pmkvq as pmkvq
    cache = pmkvq.apply(model, "plan.json")          # folds the plan's key scales, returns a cache
    model.generate(ids, past_key_values=cache)       # a fresh cache per generate call: pmkvq.apply again

Plans come from ``overdrive calibrate --method pmkvq``. The transformers cache lives in
:mod:`overdrive.pmkvq.cache` (imports transformers); this module imports nothing heavy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import PMKVQPlan

__all__ = ["PMKVQPlan", "apply", "load_plan"]


def load_plan(path: str | Path) -> PMKVQPlan:
    return PMKVQPlan.load(path)


def apply(model: Any, plan: PMKVQPlan | str | Path, mode: str = "progressive") -> Any:
    """Fold ``plan``'s key scales into ``model`` (once) and return a new :class:`~.cache.PMKVQCache`."""
    from .cache import PMKVQCache
    from .reparam import fold_scales

    if not isinstance(plan, PMKVQPlan):
        plan = PMKVQPlan.load(plan)
    fold_scales(model, plan)
    return PMKVQCache(plan, model.config, mode=mode)

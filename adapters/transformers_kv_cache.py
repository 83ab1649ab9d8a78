"""transformers side of KV-cache methods (kind ``kv_cache_attention``): a ``Cache`` to pass to ``generate``.

    import overdrive.transformers
    cache = overdrive.transformers.kv_cache(model, "pmkvq", plan="plan.json")   # once per generate call
    model.generate(ids, past_key_values=cache)

The method builds the cache (and may prepare the model, e.g. fold a reparameterisation into it);
the plan is checked against the model with an error naming any mismatch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import overdrive
from overdrive.kinds import Kind


def kv_cache(model: Any, method: str, plan: str | Path | Mapping[str, Any] | Any, **options: Any) -> Any:
    """A new transformers ``Cache`` implementing KV-cache ``method`` with ``plan`` for ``model``."""
    spec = overdrive.get_method(method, Kind.KV_CACHE)
    impl = spec.load_impl()
    return impl.transformers_cache(model, impl.load_config(plan), **options)

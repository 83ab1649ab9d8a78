"""R2R (Roads to Rome): token routing between a small and a large model (kind ``token_routing``).

    import overdrive.r2r as r2r
    router = r2r.load_router("./router", small_model="./R1-1.5B")
    out = r2r.generate(small, large, router, input_ids, max_new_tokens=256)   # transformers reference loop
    out.tokens, out.routed

    overdrive calibrate --method r2r --small ./R1-1.5B --large ./R1-32B --data q.jsonl --output ./router
    overdrive serve-r2r --small ./R1-1.5B --large ./R1-32B --router ./router   # two vLLM engines, OpenAI API

The router (:mod:`.router`), its checkpoint format (:mod:`.config`), the label pipeline
(:mod:`.labels`) and training (:mod:`.train`) are plain torch; the generation loops are the routing
drivers of the adapters (transformers: ``overdrive.transformers.routed_generate``, reached here through
the adapter catalogue with :func:`overdrive.driver`; vLLM: the ``serve-r2r`` server). This module
imports nothing heavy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import R2RRouterConfig

__all__ = ["R2RRouterConfig", "generate", "load_router"]


def load_router(router_dir: str | Path, small_model: str | Path, device: Any = "cpu") -> Any:
    """The router in ``router_dir``, checked against the small model checkpoint ``small_model``."""
    from .router import load_router as _load

    return _load(router_dir, small_model, device)


def generate(small: Any, large: Any, router: Any, input_ids: Any, max_new_tokens: int = 64, **kw: Any) -> Any:
    """The transformers reference loop (``overdrive.transformers.routed_generate`` with method ``r2r``):
    ``threshold`` (default: the router's), ``temperature``, ``top_p``, ``top_k``, ``generator``,
    ``ignore_eos``, ``stop_token_ids``. Returns tokens, per-position routed flags and router scores."""
    import overdrive

    routed_generate = overdrive.driver(overdrive.Kind.ROUTING, "transformers")
    return routed_generate(small, large, "r2r", router, input_ids=input_ids, max_new_tokens=max_new_tokens, **kw)

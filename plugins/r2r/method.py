"""R2R as a :class:`~overdrive.contracts.token_routing.TokenRoutingMethod` (what the routing drivers call)."""
from __future__ import annotations

from pathlib import Path

import torch

from overdrive.contracts.token_routing import TokenRoutingMethod

from .router import R2RRouter, load_config, load_router


class R2RMethod(TokenRoutingMethod):
    def router_topk(self, router_dir: str | Path) -> int:
        return load_config(router_dir).topk

    def load_router(self, router_dir: str | Path, small_model: str | Path,
                    device: str | torch.device = "cpu") -> R2RRouter:
        return load_router(router_dir, small_model, device)


METHOD = R2RMethod()

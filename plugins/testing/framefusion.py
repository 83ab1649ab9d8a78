"""Video samples for FrameFusion tests, the demo and benchmarks (deterministic, no downloads)."""
from __future__ import annotations

import torch


def partly_static_video(seed: int = 0, frames: int = 8, size: int = 112, static: float = 0.5,
                        noise: float = 0.1) -> torch.Tensor:
    """(frames, 3, size, size) uint8: the left ``static`` fraction of every frame repeats frame 0 up to
    small noise (tokens there are near-duplicates across frames, as in real footage with a still
    background), the rest is fresh content each frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, size, size, generator=g)
    cut = int(round(size * static))
    out = []
    for _ in range(frames):
        f = torch.rand(3, size, size, generator=g)
        f[:, :, :cut] = (base[:, :, :cut] + noise * torch.rand(3, size, cut, generator=g)).clamp(0, 1)
        out.append((f * 255).to(torch.uint8))
    return torch.stack(out)

"""Triton kernels. Imported only through :func:`overdrive.kernels.dispatch.load_triton_module`."""
from __future__ import annotations

import torch


def as_2d_with_output(x: torch.Tensor, n: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as (M, K), the (M, n) output: ``out`` viewed, or a new tensor in x's dtype)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out.view(m, n)
    return x2, y

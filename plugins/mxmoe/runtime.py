"""MxMoE's expert runtime, framework-neutral (torch only): experts grouped by format.

:class:`MxMoEExperts` holds one MoE layer's experts. At load, every (linear, format) group stacks the
dequantized weights of its experts in the compute dtype (``G, N, K``); W-A formats also quantize their
input activations per token at run time (:func:`overdrive.mxmoe.quant.quantize_act`). The forward takes
the router's decision (``topk_weights``, ``topk_ids``: (T, k)) and returns
``sum_j w[t, j] * down(act(gate(x)) * up(x))`` of the chosen experts, so transformers and vLLM, which
route with their own routers, run the same code. This is a dequantize-per-group runtime: memory at
run time is that of the compute dtype, not of the formats; speed is that of a float GEMM per expert
(the formats' own kernels are the GPU run's work, see docs/methods/mxmoe.md).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .config import LINEARS, Format, parse_format
from .quant import dequantize, quantize_act


class MxMoEExperts(torch.nn.Module):
    """One MoE layer's experts in their plan's formats.

    ``experts[e][linear] = (format name, checkpoint tensors)``; ``hidden``/``intermediate``: sizes."""

    def __init__(self, experts: Mapping[int, Mapping[str, tuple[str, Mapping[str, torch.Tensor]]]],
                 hidden: int, intermediate: int, dtype: torch.dtype,
                 act_fn: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.silu) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = len(experts), hidden, intermediate
        self.act_fn = act_fn
        #: (linear, expert) -> (group key, slot); groups hold stacked weights as buffers
        self.slot: dict[tuple[str, int], tuple[str, int]] = {}
        self.group_format: dict[str, Format] = {}
        stacks: dict[str, list[torch.Tensor]] = {}
        for e in range(len(experts)):
            for lin in LINEARS:
                name, tensors = experts[e][lin]
                fmt = parse_format(name)
                k = intermediate if lin == "down" else hidden
                key = f"{lin}_{name}"
                self.group_format[key] = fmt
                stacks.setdefault(key, []).append(dequantize(dict(tensors), fmt, k, dtype))
                self.slot[(lin, e)] = (key, len(stacks[key]) - 1)
        for key, ws in stacks.items():
            self.register_buffer(f"w_{key}", torch.stack(ws), persistent=False)

    def groups(self) -> dict[str, int]:
        """Group -> number of experts in it (for logs and tests)."""
        return {k: int(getattr(self, f"w_{k}").shape[0]) for k in self.group_format}

    def weight(self, lin: str, e: int) -> torch.Tensor:
        key, i = self.slot[(lin, e)]
        return getattr(self, f"w_{key}")[i]

    def linear(self, x: torch.Tensor, lin: str, e: int) -> torch.Tensor:
        key, i = self.slot[(lin, e)]
        fmt = self.group_format[key]
        if not fmt.weight_only:
            x = quantize_act(x, fmt.act_bits)
        return torch.nn.functional.linear(x, getattr(self, f"w_{key}")[i])

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.linear(self.act_fn(self.linear(x, "gate", e)) * self.linear(x, "up", e), "down", e)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        ids = topk_ids.long()
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            y = self.expert(x[tok], int(e)) * topk_weights[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out

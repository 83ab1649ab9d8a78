"""The AWQ/MBQ scale search as math (a leaf: torch and :mod:`.quant` only): scaling groups of a decoder
block, folding scales, the rho grid and the search over it.

A group is a set of linear layers sharing an input (q,k,v; gate,up; o; down) and the module whose
output channels feed that input (a norm or a linear), so a per-input-channel scale ``s`` can be folded
into the group's weights (``W[:, c] *= s[c]``) and divided out of the feeding module: the float function
is unchanged and the quantized one changes. The pipeline that drives a model through this is
:mod:`.calibrate`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping

import torch

from .config import MBQConfig
from .quant import fake_quant_act, fake_quant_weight

GRID = [i / 20 for i in range(20)]  # rho in {0, 0.05, ..., 0.95}

#: which enclosing module judges a group's scales ("attn": the attention block; "mlp": the MLP);
#: groups not listed are judged on their own linear outputs (as AWQ does for v->o and up->down)
ENCLOSING = {"qkv": "attn", "gate_up": "mlp"}


@dataclasses.dataclass
class GroupResult:
    layer: int
    group: str
    rho: float
    loss: float
    rtn_loss: float


@dataclasses.dataclass
class Group:
    name: str
    prev: torch.nn.Module  # norm (has .weight) or linear whose output channels feed the group
    linears: list[torch.nn.Linear]
    branch: str  # "attn" or "mlp": which reweighting ratio applies
    #: the role whose input is the group's input (for recording)
    input_role: str = ""


def block_groups(roles: Mapping[str, torch.nn.Module], fold_down: bool = True) -> list[Group]:
    """The scaling groups of a decoder block, from its sub-modules by role (see the LLM calibration contract).
    ``fold_down`` False leaves out (up -> down): with an online Hadamard on down_proj's inputs (a rotated
    model, :mod:`.rotation`) a scale on them cannot be folded into up_proj."""
    r = roles
    groups = [Group("qkv", r["attn_norm"], [r["q"], r["k"], r["v"]], "attn", "q")]
    if r["v"].out_features == r["o"].in_features:  # with grouped KV heads the shapes do not allow it
        groups.append(Group("o", r["v"], [r["o"]], "attn", "o"))
    groups.append(Group("gate_up", r["mlp_norm"], [r["gate"], r["up"]], "mlp", "gate"))
    if fold_down:
        groups.append(Group("down", r["up"], [r["down"]], "mlp", "down"))
    return groups


def layer_groups(layer: torch.nn.Module) -> list[Group]:
    """The groups of a Llama/Qwen2-style block given as a module (attribute names as in transformers)."""
    a, m = layer.self_attn, layer.mlp
    return block_groups({"attn_norm": layer.input_layernorm, "q": a.q_proj, "k": a.k_proj, "v": a.v_proj,
                         "o": a.o_proj, "mlp_norm": layer.post_attention_layernorm, "gate": m.gate_proj,
                         "up": m.up_proj, "down": m.down_proj})


@torch.no_grad()
def fold_scales(group: Group, s: torch.Tensor) -> None:
    """W_linear[:, c] *= s[c]; prev output channel c /= s[c]. Function-preserving in float."""
    s = s.to(torch.float32)
    prev = group.prev
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s.to(prev.weight)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:
        prev.weight.div_(s.to(prev.weight))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias))
    for lin in group.linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])


def loss(out: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, mode: str) -> float:
    """Token-weighted mean over tokens of the mean absolute (``mae``) or squared error over features."""
    d = (out - ref).abs() if mode == "mae" else (out - ref) ** 2
    return float((d.mean(dim=-1) * w).sum() / w.sum().clamp_min(1e-12))


def grid_scales(x_mean: torch.Tensor) -> Iterable[tuple[float, torch.Tensor]]:
    for rho in GRID:
        s = x_mean.pow(rho)
        yield rho, s / (s.max() * s.min()).sqrt()


def search(x_mean: torch.Tensor, evaluate: Callable[[torch.Tensor], torch.Tensor], ref: torch.Tensor,
           tok_w: torch.Tensor, mode: str) -> tuple[torch.Tensor, float, float, float]:
    """Grid search over rho: (best s, rho, its loss, the loss at rho = 0, i.e. RTN)."""
    best: tuple[torch.Tensor | None, float, float] = (None, 0.0, math.inf)
    rtn_loss = math.inf
    for rho, s in grid_scales(x_mean):
        value = loss(evaluate(s), ref, tok_w, mode)
        if rho == 0.0:
            rtn_loss = value
        if value < best[2]:
            best = (s, rho, value)
    assert best[0] is not None, "every grid point gave a NaN loss"
    return best[0], best[1], best[2], rtn_loss


@torch.inference_mode()
def search_group(x: torch.Tensor, group: Group, tok_w: torch.Tensor, cfg: MBQConfig, mode: str,
                 x_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float, float]:
    """Best scales for one group judged on the group's own linear outputs on rows ``x`` (tokens, features):
    (s, rho, loss, RTN loss). ``x_mean``: mean |x| per channel (default: over ``x``)."""
    x = x.to(torch.float32)
    ws = [lin.weight.float() for lin in group.linears]
    ref = torch.cat([torch.nn.functional.linear(x, w, None) for w in ws], dim=-1)

    def evaluate(s: torch.Tensor) -> torch.Tensor:
        xs = x / s[None, :]
        if cfg.act_bits == 8:
            xs = fake_quant_act(xs)
        return torch.cat([torch.nn.functional.linear(xs, fake_quant_weight(w * s[None, :], cfg), None) for w in ws],
                         dim=-1)

    if x_mean is None:
        x_mean = x.abs().mean(dim=0)
    return search(x_mean.clamp_min(1e-6), evaluate, ref, tok_w, mode)

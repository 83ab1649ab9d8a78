"""FrameFusion's math on plain tensors: predecessors at the same patch, similarity, merging runs into
their first token, pruning by importance, and the closed-form pruning ratio for a compute budget
(each tested against hand-computed cases and float64 references)."""
from __future__ import annotations

from typing import Sequence

import torch


def predecessors(patch: torch.Tensor) -> torch.Tensor:
    """For each token, the index of the previous token with the same patch id, or -1.

    ``patch`` (n,) holds a patch id >= 0 for vision tokens and a negative value for text tokens
    (never merged, never a predecessor).
    """
    n = patch.numel()
    pred = torch.full((n,), -1, dtype=torch.long, device=patch.device)
    if n < 2:
        return pred
    sp, order = torch.sort(patch, stable=True)  # by patch id, sequence order within a patch
    same = torch.zeros(n, dtype=torch.bool, device=patch.device)
    same[1:] = (sp[1:] == sp[:-1]) & (sp[1:] >= 0)
    pred_sorted = torch.full((n,), -1, dtype=torch.long, device=patch.device)
    pred_sorted[1:] = order[:-1]
    pred_sorted[~same] = -1
    pred[order] = pred_sorted
    return pred


def similarity_to_predecessor(hidden: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token with its predecessor (float32); -inf where there is none."""
    h = hidden.float()
    sim = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
    has = pred >= 0
    if has.any():
        a, b = h[has], h[pred[has]]
        denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
        sim[has] = (a * b).sum(-1) / denom
    return sim


def merge_roots(merge: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """For each token that merges, the token its run collapses into (the run's first token); -1 else."""
    root = torch.where(merge, pred, torch.full_like(pred, -1))
    while True:
        chained = merge & (root >= 0)
        chained &= merge[root.clamp_min(0)]
        if not chained.any():
            return root
        root = torch.where(chained, pred[root.clamp_min(0)], root)


def apply_merge(hidden: torch.Tensor, merge: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens flagged in ``merge`` into their run roots (runs averaged into the first token).

    Returns (keep (m,) ascending indices of the remaining tokens, hidden (m, D) of those tokens).
    """
    keep = (~merge).nonzero().squeeze(-1)
    if not merge.any():
        return keep, hidden
    root = merge_roots(merge, pred)
    members = merge.nonzero().squeeze(-1)
    acc = hidden.float().clone()
    count = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    acc.index_add_(0, root[members], hidden[members].float())
    count.index_add_(0, root[members], torch.ones(members.numel(), device=hidden.device))
    merged = (acc / count[:, None]).to(hidden.dtype)
    return keep, merged[keep]


def top_merges(sim: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` most similar tokens (ties: earlier token first)."""
    mask = torch.zeros_like(sim, dtype=torch.bool)
    if count > 0:
        order = torch.sort(sim, descending=True, stable=True).indices[:count]
        mask[order] = True
    return mask


def prune_keep(importance: torch.Tensor, vision: torch.Tensor, remove: int) -> torch.Tensor:
    """Ascending indices kept after removing the ``remove`` least important vision tokens."""
    n = importance.numel()
    keep = torch.ones(n, dtype=torch.bool, device=importance.device)
    vis_idx = vision.nonzero().squeeze(-1)
    remove = max(0, min(int(remove), vis_idx.numel()))
    if remove:
        order = torch.sort(importance[vis_idx].float(), descending=False, stable=True).indices[:remove]
        keep[vis_idx[order]] = False
    return keep.nonzero().squeeze(-1)


def pruning_ratio(merge_ratios: Sequence[float], cost: float, num_layers: int) -> float:
    """Fraction p of the remaining vision tokens to prune now so the average over ``num_layers``
    layers of the vision-token fraction equals ``cost``, after ``len(merge_ratios)`` merge steps
    (one per layer, from layer 0) that each removed ``merge_ratios[i]`` of the tokens before it.

    Clamped to [0, 1]: 0 when the budget already allows every remaining token, 1 when merging alone
    overspent it (the reducer's guards avoid the latter).
    """
    s, spent = 1.0, 0.0
    for r in merge_ratios:
        s *= 1.0 - r
        spent += s
    left = num_layers - len(merge_ratios)
    if left <= 0 or s <= 0.0:
        return 0.0
    remain = num_layers * cost - spent
    return min(1.0, max(0.0, 1.0 - remain / (left * s)))


def importance_proxy(embeds: torch.Tensor, kind: str) -> torch.Tensor:
    """Query-agnostic importance of each embedding (float32, higher = keep).

    ``deviation``: ||x_i / rms(x_i) - mean_j(x_j / rms(x_j))||. The decoder's first operation is an
    RMS norm, and softmax attention is invariant to a key component shared by all tokens, so a
    token's attention logit varies with the query only through its normalised deviation from the
    mean; for a query we cannot see, the tokens with the largest deviation have the largest spread
    of logits and are the likeliest to be attended. ``norm``: ||x_i||.
    """
    x = embeds.float()
    if kind == "norm":
        return x.norm(dim=-1)
    if kind == "deviation":
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))
        return (xn - xn.mean(0, keepdim=True)).norm(dim=-1)
    raise ValueError(f"unknown importance proxy {kind!r}; known: deviation, norm")

"""FrameFusion (thu-nics/FrameFusion, ICCV'25) as a framework-neutral token reducer.

Re-derived from the paper's idea; no reference code copied. Two stages, per sample (the math of
both in :mod:`.merging`):

**Merging.** For every vision token, the previous token *at the same spatial patch* (the nearest
earlier remaining token of that patch in the sequence; for the first frame there is none) is its
predecessor. A token whose cosine similarity with its predecessor is at least
``similarity_lower_bound`` merges into it; a run of consecutive merges collapses into the run's first
token, whose hidden state becomes the mean of the run. First-frame tokens have no predecessor and are
never removed by merging. Per layer, the merge ratio r = merged / vision tokens before the step; the
step repeats at the next layer while r >= ``ratio_lower_bound``.

**Pruning.** Once merging stops, one step keeps the top (1 - p) of the remaining vision tokens by the
last query token's attention averaged over heads. p is solved in closed form from ``cost``, the
average fraction of vision-token compute over the decoder's L layers (the model's real depth; the
reference hard-codes 28): with s_i = prod_{j<=i} (1 - r_j) the fraction kept after merge step i and k
merge steps done, ``L * cost = sum_i s_i + (L - k) * s_k * (1 - p)``.

Every reduction here happens *at a layer's input* (the per-layer adapter applies it before the
layer), so layer l computes on exactly the tokens counted for it and the budget equation is exact up
to rounding to whole tokens. Two guards keep the budget reachable: if a layer's candidate merges
exceed what the budget needs, only the most similar ones merge and the reduction ends there (as the
reference); if merging would overspend layers that no later pruning step can recover (or this is the
last layer), this layer merges and prunes at once to land on the budget.

**Before the decoder** (:meth:`FrameFusion.select`, one KV length for all layers, e.g. vLLM): the
same merging on the vision embeddings, repeated while r >= ``ratio_lower_bound`` and capped so that
exactly ``num_keep`` tokens remain, then pruning by a query-agnostic importance proxy (the embeddings
are computed per video and cached by media hash, so they cannot depend on the text of one request),
by default scaled by the number of original tokens a merged token stands for.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from overdrive.contracts.token_reduction import (AttentionProbe, LayerwiseReducer, Reduction, Selection,
                                                 TokenReductionMethod, VideoGrid, VisionSpan)

from .config import FrameFusionConfig
from .merging import (apply_merge, importance_proxy, merge_roots, predecessors, prune_keep, pruning_ratio,
                      similarity_to_predecessor, top_merges)


# -- per-layer reduction (transformers) ----------------------------------------------------------
@dataclasses.dataclass
class _Sample:
    patch: torch.Tensor           # (n,) patch id per current token (-1: text)
    vision0: int                  # vision tokens before any reduction
    ratios: list[float] = dataclasses.field(default_factory=list)
    merging: bool = True
    prune_next: bool = False
    done: bool = False
    merged: int = 0
    pruned: int = 0
    per_layer: list[int] = dataclasses.field(default_factory=list)
    events: list[str] = dataclasses.field(default_factory=list)

    @property
    def vision(self) -> int:
        return int((self.patch >= 0).sum())


class FrameFusionReducer(LayerwiseReducer):
    """Per-request FrameFusion state over a batch (each sample has its own budget and stage)."""

    def __init__(self, cfg: FrameFusionConfig, num_layers: int, spans: Sequence[Sequence[VisionSpan]],
                 lengths: Sequence[int]) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if len(spans) != len(lengths):
            raise ValueError(f"{len(spans)} span lists for {len(lengths)} samples")
        self.cfg, self.num_layers = cfg, num_layers
        self.similarity = cfg.similarity_for("")
        self.samples = [self._init_sample(b, s, n) for b, (s, n) in enumerate(zip(spans, lengths))]
        self._next_layer = 0

    @staticmethod
    def _init_sample(b: int, spans: Sequence[VisionSpan], length: int) -> _Sample:
        patch = torch.full((length,), -1, dtype=torch.long)
        offset, end = 0, 0
        for span in sorted(spans, key=lambda s: s.start):
            if span.start < end or span.stop > length:
                raise ValueError(f"sample {b}: video span [{span.start}, {span.stop}) overlaps another or "
                                 f"exceeds the sequence length {length}")
            tpf = span.grid.tokens_per_frame
            patch[span.start:span.stop] = offset + torch.arange(span.grid.num_tokens) % tpf
            offset += tpf
            end = span.stop
        vis = int((patch >= 0).sum())
        return _Sample(patch=patch, vision0=vis, done=vis == 0, merging=vis > 0)

    @property
    def done(self) -> bool:
        return all(s.done for s in self.samples)

    def step(self, layer_idx: int, hiddens: Sequence[torch.Tensor], probe: AttentionProbe) -> list[Reduction] | None:
        if layer_idx != self._next_layer:
            raise RuntimeError(f"FrameFusion expected layer {self._next_layer}, got layer {layer_idx}")
        self._next_layer += 1
        if self.done:
            for s in self.samples:
                s.per_layer.append(s.vision)
            return None
        if len(hiddens) != len(self.samples):
            raise ValueError(f"{len(hiddens)} hidden-state tensors for {len(self.samples)} samples")
        keeps: list[torch.Tensor] = []
        news: list[torch.Tensor] = []
        to_prune: dict[int, int] = {}  # sample -> vision tokens to prune after merging
        for b, (s, h) in enumerate(zip(self.samples, hiddens)):
            if h.shape[0] != s.patch.numel():
                raise ValueError(f"sample {b}: {h.shape[0]} hidden states for {s.patch.numel()} tracked tokens")
            keep, new, remove = self._merge_stage(s, layer_idx, h)
            keeps.append(keep)
            news.append(new)
            if remove:
                to_prune[b] = remove
        if to_prune:
            order = sorted(to_prune)
            # importance over the tokens as they enter this layer (after this layer's merges)
            scores = probe(order, [news[b] for b in order], [keeps[b] for b in order])
            for b, score in zip(order, scores):
                s = self.samples[b]
                vis = s.patch[keeps[b].cpu()] >= 0
                k2 = prune_keep(score.detach().cpu(), vis, to_prune[b]).to(keeps[b].device)
                s.pruned += keeps[b].numel() - k2.numel()
                keeps[b], news[b] = keeps[b][k2], news[b][k2]
        out = []
        for b, s in enumerate(self.samples):
            s.patch = s.patch[keeps[b].cpu()]
            s.per_layer.append(s.vision)
            out.append(Reduction(keeps[b], news[b]))
        return out

    def _merge_stage(self, s: _Sample, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This layer's merges for one sample: (keep, hidden, vision tokens still to prune here)."""
        n_all = s.patch.numel()
        ident = torch.arange(n_all, device=h.device)
        if s.done:
            return ident, h, 0
        n = s.vision
        cost, L = self.cfg.cost, self.num_layers
        if s.prune_next:
            p = pruning_ratio(s.ratios, cost, L)
            s.done = True
            s.events.append(f"layer {layer}: prune p={p:.4f}")
            return ident, h, round(p * n)
        ub = pruning_ratio(s.ratios, cost, L)  # what pruning now would remove
        target = round(ub * n)
        if target <= 0:
            s.done = True
            s.events.append(f"layer {layer}: budget allows every token")
            return ident, h, 0
        patch = s.patch.to(h.device)
        pred = predecessors(patch)
        sim = similarity_to_predecessor(h, pred)
        cand = sim >= self.similarity
        m = int(cand.sum())
        if m >= target:  # merging alone reaches the budget: only the most similar merge, then stop
            merge = top_merges(torch.where(cand, sim, torch.full_like(sim, float("-inf"))), target)
            keep, new = apply_merge(h, merge, pred)
            s.merged += target
            s.done = True
            s.events.append(f"layer {layer}: merge {target}/{n} (capped at the budget), done")
            return keep, new, 0
        r = m / n
        s_prev = 1.0
        spent = 0.0
        for x in s.ratios:
            s_prev *= 1.0 - x
            spent += s_prev
        s_new = s_prev * (1.0 - r)
        last = layer >= L - 1
        keep, new = apply_merge(h, cand, pred)
        s.merged += m
        if last or spent + s_new > L * cost + 1e-9:
            # no later layer can recover this spending: prune the rest of this layer's budget now
            s.done = True
            s.events.append(f"layer {layer}: merge {m}/{n} and prune {target - m} (budget guard)")
            return keep, new, target - m
        s.ratios.append(r)
        s.events.append(f"layer {layer}: merge {m}/{n} (r={r:.4f})")
        if r < self.cfg.ratio_lower_bound:
            s.merging, s.prune_next = False, True
        return keep, new, 0

    def summary(self) -> list[dict]:
        out = []
        for s in self.samples:
            full = len(s.per_layer) == self.num_layers and s.vision0 > 0
            out.append({"vision_tokens": s.vision0, "per_layer": list(s.per_layer), "merged": s.merged,
                        "pruned": s.pruned, "merge_ratios": list(s.ratios), "events": list(s.events),
                        "cost": (sum(s.per_layer) / (self.num_layers * s.vision0)) if full else None})
        return out


# -- the method object ---------------------------------------------------------------------------
class FrameFusion(TokenReductionMethod):
    def resolve(self, cfg: FrameFusionConfig, family: str) -> FrameFusionConfig:
        return cfg.replace(similarity_lower_bound=cfg.similarity_for(family))

    def keep_fraction(self, cfg: FrameFusionConfig) -> float:
        return cfg.cost

    def layerwise(self, cfg: FrameFusionConfig, num_layers: int, spans: Sequence[Sequence[VisionSpan]],
                  lengths: Sequence[int]) -> FrameFusionReducer:
        return FrameFusionReducer(cfg, num_layers, spans, lengths)

    def select(self, embeds: torch.Tensor, grid: VideoGrid, num_keep: int, cfg: FrameFusionConfig) -> Selection:
        n = grid.num_tokens
        if embeds.dim() != 2 or embeds.shape[0] != n:
            raise ValueError(f"FrameFusion.select: video embeddings of shape {tuple(embeds.shape)} do not match "
                             f"the grid {grid.frames}x{grid.rows}x{grid.cols} = {n} tokens")
        if not 1 <= num_keep <= n:
            raise ValueError(f"FrameFusion.select: num_keep must be in [1, {n}], got {num_keep}")
        similarity = cfg.similarity_for("")
        patch = torch.arange(n, device=embeds.device) % grid.tokens_per_frame
        index = torch.arange(n, device=embeds.device)  # original index of each current token
        count = torch.ones(n, device=embeds.device)     # original tokens each current token stands for
        h = embeds
        need = n - num_keep
        merged = 0
        while need > 0:
            pred = predecessors(patch)
            sim = similarity_to_predecessor(h, pred)
            cand = sim >= similarity
            m = int(cand.sum())
            if m == 0:
                break
            if m >= need:
                cand = top_merges(torch.where(cand, sim, torch.full_like(sim, float("-inf"))), need)
                m = need
            members = cand.nonzero().squeeze(-1)
            count = count.index_add(0, merge_roots(cand, pred)[members], count[members])
            keep, h = apply_merge(h, cand, pred)
            patch, index, count = patch[keep], index[keep], count[keep]
            merged += m
            ratio = m / (need + num_keep)
            need -= m
            if ratio < cfg.ratio_lower_bound:
                break
        pruned = 0
        if need > 0:
            score = importance_proxy(h, cfg.importance)
            if cfg.weight_merged:
                score = score * count
            keep = prune_keep(score, torch.ones_like(patch, dtype=torch.bool), need)
            h, index = h[keep], index[keep]
            pruned = need
        return Selection(keep=index, embeds=h, merged=merged, pruned=pruned)

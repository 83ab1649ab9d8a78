"""Training the R2R router on a :class:`~overdrive.r2r.labels.LabelSet`, and picking its threshold.

Binary cross-entropy on the router logit (AdamW; R2R: lr 5e-5, weight decay 5e-4, batch 1024,
50 epochs), with positives weighted by the negative/positive ratio unless ``pos_weight`` is given
(labels are heavily imbalanced: most positions are identical). Queries are split into training and
validation sets by query, not by position, so a query's positions never sit on both sides.

The threshold keeps at least ``recall`` of the validation set's divergent tokens routed (R2R: 0.95)
and routes no more of that set than the largest such threshold, ``p_(ceil(recall * n))`` of the
divergent probabilities sorted descending, would; it sits in the middle of the gap below that value
(:func:`threshold_for_recall`). Fewer than ``min_val_positives`` divergent validation tokens and the
threshold is picked on the training set instead (recorded in ``training.threshold_from``).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from overdrive.config import ConfigError
from overdrive.progress import progress

from .config import R2RRouterConfig
from .labels import LabelSet
from .router import R2RRouterNet, init_net


@dataclasses.dataclass
class TrainOptions:
    epochs: int = 50
    batch_size: int = 1024
    lr: float = 5e-5
    weight_decay: float = 5e-4
    recall: float = 0.95
    val_fraction: float = 0.1
    pos_weight: float | None = None   # None: negatives / positives of the training split
    min_val_positives: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.recall <= 1.0:
            raise ConfigError(f"--recall must be in (0, 1], got {self.recall}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"--epochs ({self.epochs}), --batch-size ({self.batch_size}) and --lr ({self.lr}) "
                              "must be positive")


def threshold_for_recall(probs: torch.Tensor, recall: float, others: torch.Tensor | None = None) -> float:
    """A threshold routing at least ``recall`` of the positive rows (probabilities ``probs``) and nothing
    more on this data than the largest such threshold would: with ``p`` the positives' probability of rank
    ``ceil(recall * n)``, the midpoint between ``p`` and the largest probability of any row (``probs`` and
    ``others``) below it (0 if none). No observed probability sits on the threshold, so float noise
    between engines cannot flip a decision on a token seen in training."""
    if probs.numel() == 0:
        raise ConfigError("no divergent tokens to pick a threshold from; label more data (or a judge that finds "
                          "divergences)")
    ordered = probs.double().sort(descending=True).values
    need = max(1, math.ceil(recall * ordered.numel() - 1e-9))
    p = ordered[need - 1]
    seen = ordered if others is None else torch.cat([ordered, others.double().flatten()])
    below = seen[seen < p]
    return float((p + (below.max() if below.numel() else torch.tensor(0.0, dtype=torch.float64))) / 2)


def split_by_query(data: LabelSet, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean row masks (train, val), whole queries on one side."""
    queries = torch.unique(data.sample)
    g = torch.Generator().manual_seed(seed)
    order = queries[torch.randperm(queries.numel(), generator=g)]
    n_val = int(round(val_fraction * queries.numel()))
    if val_fraction > 0 and queries.numel() > 1:
        n_val = max(1, min(n_val, queries.numel() - 1))
    else:
        n_val = 0
    val = torch.isin(data.sample, order[:n_val])
    return ~val, val


@torch.no_grad()
def probabilities(net: R2RRouterNet, embedding: torch.Tensor, data: LabelSet, rows: torch.Tensor,
                  batch_size: int = 4096) -> torch.Tensor:
    net.eval()
    idx = torch.nonzero(rows).flatten()
    out = [torch.sigmoid(net(data.hidden[b], data.topk_logits[b], embedding[data.token[b]]))
           for b in idx.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def train_router(data: LabelSet, cfg: R2RRouterConfig, embedding: torch.Tensor, opts: TrainOptions
                 ) -> tuple[R2RRouterNet, R2RRouterConfig]:
    """Train a router for ``cfg`` (architecture + small_model identity); returns it and ``cfg`` with the
    chosen threshold and a training record. Deterministic for a given ``opts.seed`` on one machine
    (initialisation, shuffling and dropout draw from seeded generators; the global RNG is restored)."""
    with torch.random.fork_rng():
        torch.manual_seed(opts.seed)
        return _train(data, cfg, embedding, opts)


def _train(data: LabelSet, cfg: R2RRouterConfig, embedding: torch.Tensor, opts: TrainOptions
           ) -> tuple[R2RRouterNet, R2RRouterConfig]:
    if data.topk_logits.shape[1] < cfg.topk:
        raise ConfigError(f"labels carry the top {data.topk_logits.shape[1]} logits; the router reads {cfg.topk}")
    if data.hidden.shape[1] != cfg.hidden_size:
        raise ConfigError(f"labels carry hidden states of size {data.hidden.shape[1]}; the small model's is "
                          f"{cfg.hidden_size} (labels made with another small model?)")
    if int(data.token.max()) >= embedding.shape[0]:
        raise ConfigError(f"labels hold token ids up to {int(data.token.max())}, beyond the small model's "
                          f"embedding table ({embedding.shape[0]} rows)")
    data = dataclasses.replace(data, topk_logits=data.topk_logits[:, :cfg.topk].float(), hidden=data.hidden.float())
    emb = embedding.float()
    train, val = split_by_query(data, opts.val_fraction, opts.seed)
    y = data.label.float()
    n_pos = int(y[train].sum())
    n_neg = int(train.sum()) - n_pos
    if n_pos == 0:
        raise ConfigError(f"the training split has no divergent tokens ({data.counts()}); the router cannot learn "
                          "when to route. Label more queries, or use a judge that finds divergences")
    pos_weight = opts.pos_weight if opts.pos_weight is not None else max(1.0, n_neg / n_pos)
    net = init_net(cfg, cfg.hidden_size, emb.shape[1], seed=opts.seed)
    optim = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    g = torch.Generator().manual_seed(opts.seed)
    idx = torch.nonzero(train).flatten()
    losses = []
    for _ in progress(range(opts.epochs), desc="r2r: training", unit="epoch"):
        net.train()
        total = 0.0
        for b in idx[torch.randperm(idx.numel(), generator=g)].split(opts.batch_size):
            logit = net(data.hidden[b], data.topk_logits[b], emb[data.token[b]])
            loss = loss_fn(logit, y[b])
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += float(loss.detach()) * b.numel()
        losses.append(total / idx.numel())
    pick = val if int(y[val].sum()) >= opts.min_val_positives else train
    p = probabilities(net, emb, data, pick)
    labels = data.label[pick].bool()
    threshold = threshold_for_recall(p[labels], opts.recall, p[~labels])
    routed = p >= threshold
    record = {
        "labels": data.counts(), "train_positions": int(train.sum()), "val_positions": int(val.sum()),
        "pos_weight": pos_weight, "epochs": opts.epochs, "lr": opts.lr, "weight_decay": opts.weight_decay,
        "batch_size": opts.batch_size, "seed": opts.seed, "loss_first_epoch": losses[0], "loss_last_epoch": losses[-1],
        "recall_target": opts.recall, "threshold_from": "validation" if pick is val else "training",
        "recall": float(routed[labels].float().mean()), "routed_fraction": float(routed.float().mean()),
        "label_meta": data.meta,
    }
    return net.eval(), cfg.replace(threshold=min(1.0, max(0.0, threshold)), training=record)

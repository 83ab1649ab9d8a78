"""Router training: the recall threshold (closed form), query-level splits, learning a separable rule."""
from __future__ import annotations

import math

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.r2r.config import R2RRouterConfig
from overdrive.r2r.labels import KIND_DIVERGENT, KIND_IDENTICAL, LabelSet
from overdrive.r2r.router import R2RRouter
from overdrive.contracts.token_routing import RouterInputs
from overdrive.r2r.train import TrainOptions, split_by_query, threshold_for_recall, train_router

D, K, V = 16, 8, 50


def _ident() -> dict:
    return {"architecture": "Test", "hidden_size": D, "vocab_size": V, "embedding": "e", "embedding_shape": [V, D],
            "embedding_sha256": "0" * 64}


def test_threshold_for_recall_closed_form():
    p = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])
    # sorted: .9 .7 .5 .3 .1; recall 0.6 of 5 -> 3 must pass -> p_3 = .5, next below .3 -> (.5 + .3) / 2
    assert threshold_for_recall(p, 0.6) == pytest.approx(0.4)
    assert threshold_for_recall(p, 0.61) == pytest.approx(0.2)     # 4 must pass: (.3 + .1) / 2
    assert threshold_for_recall(p, 1.0) == pytest.approx(0.05)     # all: (.1 + 0) / 2
    assert threshold_for_recall(p, 0.2) == pytest.approx(0.8)
    # negatives between .5 and .3 narrow the gap: the routed set on this data stays the same
    others = torch.tensor([0.45, 0.95, 0.05])
    assert threshold_for_recall(p, 0.6, others) == pytest.approx(0.475)
    for r in (0.2, 0.6, 0.61, 0.95, 1.0):
        t = threshold_for_recall(p, r, others)
        need = math.ceil(r * 5 - 1e-9)
        assert int((p >= t).sum()) == need                       # the recall target, and no positive more
        p_need = p.sort(descending=True).values[need - 1]
        assert int((others >= t).sum()) == int((others >= p_need).sum())  # no negative more than at p_need
        assert not torch.isclose(torch.cat([p, others]), torch.tensor(t)).any()
    with pytest.raises(ConfigError, match="no divergent tokens"):
        threshold_for_recall(torch.zeros(0), 0.9)


def _separable(n_queries: int = 40, per: int = 30, seed: int = 0) -> tuple[LabelSet, torch.Tensor]:
    """Divergent iff the hidden state's first coordinate > 1 (about one position in six)."""
    g = torch.Generator().manual_seed(seed)
    n = n_queries * per
    hidden = torch.randn(n, D, generator=g)
    label = (hidden[:, 0] > 1.0).long()
    data = LabelSet(hidden=hidden, topk_logits=torch.randn(n, K, generator=g).sort(-1, descending=True).values,
                    token=torch.randint(0, V, (n,), generator=g), label=label,
                    kind=torch.where(label.bool(), KIND_DIVERGENT, KIND_IDENTICAL),
                    sample=torch.arange(n_queries).repeat_interleave(per))
    return data, torch.randn(V, D, generator=g)


def test_split_keeps_queries_whole():
    data, _ = _separable()
    train, val = split_by_query(data, 0.25, seed=1)
    assert not set(data.sample[train].tolist()) & set(data.sample[val].tolist())
    assert len(set(data.sample[val].tolist())) == 10 and bool((train ^ val).all())


def test_router_learns_a_separable_rule_and_keeps_recall():
    data, emb = _separable()
    cfg = R2RRouterConfig(topk=K, width=32, num_blocks=1, expansion=2, dropout=0.0, small_model=_ident())
    opts = TrainOptions(epochs=40, batch_size=128, lr=3e-3, weight_decay=0.0, recall=0.95, val_fraction=0.25,
                        min_val_positives=20)
    net, out = train_router(data, cfg, emb, opts)
    rec = out.training
    assert rec["threshold_from"] == "validation" and rec["recall"] >= 0.95
    assert rec["loss_last_epoch"] < 0.5 * rec["loss_first_epoch"]
    # an independent check on fresh data from the same rule
    fresh, _ = _separable(n_queries=20, seed=7)
    router = R2RRouter(out, net, emb)
    p = torch.sigmoid(router.scores(RouterInputs(fresh.hidden, fresh.topk_logits, fresh.token)))
    routed = p >= out.threshold
    pos = fresh.label.bool()
    assert float(routed[pos].float().mean()) >= 0.85       # divergent tokens still routed
    assert float(routed[~pos].float().mean()) <= 0.25      # most identical tokens stay on the small model
    assert 0.0 < out.threshold < 1.0


def test_training_is_reproducible_for_a_seed():
    data, emb = _separable(n_queries=8, per=20)
    cfg = R2RRouterConfig(topk=K, width=16, num_blocks=1, expansion=2, dropout=0.3, small_model=_ident())
    opts = TrainOptions(epochs=3, batch_size=32, lr=1e-3, val_fraction=0.25)
    torch.manual_seed(123)
    a, ca = train_router(data, cfg, emb, opts)
    after = torch.rand(1)
    torch.manual_seed(456)
    b, cb = train_router(data, cfg, emb, opts)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ca.threshold == cb.threshold
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG stream is left as it was


def test_training_needs_divergent_labels_and_matching_shapes():
    data, emb = _separable()
    cfg = R2RRouterConfig(topk=K, width=8, num_blocks=0, small_model=_ident())
    none = LabelSet(**{f: getattr(data, f) for f in ("hidden", "topk_logits", "token", "kind", "sample")},
                    label=torch.zeros_like(data.label))
    with pytest.raises(ConfigError, match="no divergent tokens"):
        train_router(none, cfg, emb, TrainOptions(epochs=1))
    with pytest.raises(ConfigError, match="top 8 logits; the router reads 9"):
        train_router(data, cfg.replace(topk=9), emb, TrainOptions(epochs=1))
    with pytest.raises(ConfigError, match="--recall"):
        TrainOptions(recall=0.0)

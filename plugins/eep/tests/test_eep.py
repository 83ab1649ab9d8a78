"""EEP's math and search against independent references (float64 loops, closed forms, brute force)."""
from __future__ import annotations

import json

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.contracts.expert_pruning import (ExpertStats, LayerMaps, MoEIdentity, is_discrete, mapped_routing,
                                                merge_experts, one_hot_rows)
from overdrive.eep.config import EEPConfig, EEPPlan
from overdrive.eep.search import layer_slots, search, selection_matrix

IDENT = MoEIdentity("MixtralForCausalLM", 3, (0, 1, 2), 6, 2, 16, 8, True, False)


def _reference_routing(logits, route, k, renorm):
    """Token by token, in float64, written out."""
    n, _ = logits.shape
    weights, idx = [], []
    for t in range(n):
        z = logits[t].double()
        p = torch.exp(z - z.max())
        p = p / p.sum()
        s = [float((route[b].double() * p).sum()) for b in range(route.shape[0])]
        order = sorted(range(len(s)), key=lambda b: -s[b])[:k]
        w = [s[b] for b in order]
        if renorm:
            w = [x / sum(w) for x in w]
        weights.append(w)
        idx.append(order)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(idx)


@pytest.mark.parametrize("renorm", [True, False])
def test_mapped_routing_matches_a_float64_reference(renorm):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=g, dtype=torch.float64) * 3
    route = torch.rand(4, 6, generator=g, dtype=torch.float64)
    _, w, idx = mapped_routing(logits, route, 2, renorm)
    rw, ridx = _reference_routing(logits, route, 2, renorm)
    assert torch.equal(idx, ridx)
    assert torch.allclose(w, rw, atol=1e-12)


def test_one_hot_routes_equal_a_router_over_the_kept_gate_rows():
    """The closed form behind the discrete export: one-hot T with renormalised top-k == softmax over the
    kept rows' logits, top-k, renormalised."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 8, generator=g, dtype=torch.float64) * 2
    kept = [6, 1, 3, 4]
    _, w, idx = mapped_routing(logits, selection_matrix(kept, 8), 2, True)
    sub = torch.softmax(logits[:, kept], dim=-1)
    top, sidx = torch.topk(sub, 2, dim=-1)
    assert torch.equal(idx, sidx)
    assert torch.allclose(w, top / top.sum(-1, keepdim=True), atol=1e-12)
    # without renormalisation the weights differ by the kept probability mass: not exact
    _, w2, _ = mapped_routing(logits, selection_matrix(kept, 8), 2, False)
    assert not torch.allclose(w2, top, atol=1e-3)


def test_merge_experts_is_the_weighted_sum():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    c = torch.randn(2, 5, generator=g, dtype=torch.float64)
    out = merge_experts(w, c)
    for b in range(2):
        assert torch.allclose(out[b], sum(c[b, e] * w[e] for e in range(5)), atol=1e-12)


def test_one_hot_rows_and_discreteness():
    assert one_hot_rows(selection_matrix([2, 0], 4)) == [2, 0]
    assert one_hot_rows(torch.tensor([[1.0, 0.5], [0.0, 1.0]])) is None
    assert one_hot_rows(torch.tensor([[2.0, 0.0]])) is None
    maps = {0: LayerMaps.select([0, 1], 4, 1)}
    assert is_discrete(maps, True) and not is_discrete(maps, False)


def test_layer_groups_apply_per_layer():
    assert layer_slots([0, 1, 2, 3, 4], 0) == [[0], [1], [2], [3], [4]]
    groups = layer_slots([0, 1, 2, 3, 4], 2)
    assert sorted(sum(groups, [])) == [0, 1, 2, 3, 4] and len(groups) == 2
    target = {0: [0, 1], 1: [0, 1], 2: [4, 5]}

    def fit(maps):
        assert set(maps) == {0, 1, 2}  # every layer gets maps, whatever the grouping
        return float(sum(len(set(m.kept_routes() or []) & set(target[l])) for l, m in maps.items()))

    res = search(EEPConfig(experts=2, layer_groups=2, population=6, elite=2, prune_generations=4, merge_generations=0),
                 [0, 1, 2], 6, 2, None, fit)
    assert res.maps[0].kept_routes() == res.maps[1].kept_routes()  # layers 0 and 1 share a slot


def _synthetic(target, e):
    """Fitness with a known optimum: how many target experts each layer keeps (+ a small bonus for merge
    rows that stay close to their one-hot selection)."""
    def fit(maps):
        score = 0.0
        for l, m in maps.items():
            kept = [int(i) for i in m.route.argmax(dim=1)]
            score += len(set(kept) & set(target[l]))
            score -= 0.01 * float((m.merge - selection_matrix(kept, e)).abs().sum())
        return score
    return fit


def test_the_search_finds_the_optimum_of_a_known_problem_and_is_deterministic():
    e, layers = 8, [0, 1, 2, 3]
    g = torch.Generator().manual_seed(5)
    target = {l: sorted(torch.randperm(e, generator=g)[:3].tolist()) for l in layers}
    cfg = EEPConfig(experts=3, population=10, elite=3, prune_generations=25, merge_generations=2, seed=3)
    res = search(cfg, layers, e, 2, None, _synthetic(target, e))
    assert {l: sorted(m.kept_routes() or []) for l, m in res.maps.items()} == target
    again = search(cfg, layers, e, 2, None, _synthetic(target, e))
    assert all(torch.equal(res.maps[l].merge, again.maps[l].merge) for l in layers)
    # the best random selection of the same number of evaluations does worse (the search is not luck)
    rng = torch.Generator().manual_seed(9)
    fit = _synthetic(target, e)
    rand_best = max(fit({l: LayerMaps.select(sorted(torch.randperm(e, generator=rng)[:3].tolist()), e, 2)
                         for l in layers}) for _ in range(res.evaluations))
    assert res.train_fitness > rand_best


def test_frequency_and_reap_baselines_keep_the_top_experts():
    stats = {0: ExpertStats(torch.tensor([.1, .4, .2, .3]), torch.ones(4), torch.tensor([5., 1., 3., 2.]))}
    fit = lambda maps: 0.0  # noqa: E731
    f = search(EEPConfig(experts=2, strategy="frequency"), [0], 4, 2, stats, fit)
    r = search(EEPConfig(experts=2, strategy="reap"), [0], 4, 2, stats, fit)
    assert f.maps[0].kept_routes() == [1, 3] and r.maps[0].kept_routes() == [0, 2]
    rnd = search(EEPConfig(experts=2, strategy="random", seed=4), [0], 4, 2, None, fit)
    assert len(set(rnd.maps[0].kept_routes())) == 2
    with pytest.raises(ConfigError, match="routing statistics"):
        search(EEPConfig(experts=2, strategy="reap"), [0], 4, 2, None, fit)


def test_stage_two_merges_and_freeze_route_keeps_plans_exportable():
    e, layers = 6, [0, 1]
    fit = lambda maps: -sum(float((m.merge.sum(1) - 1.3).abs().sum()) for m in maps.values())  # noqa: E731
    free = search(EEPConfig(experts=2, population=6, elite=2, prune_generations=1, merge_generations=6,
                            noise_prob=0.5, noise_scale=0.2), layers, e, 2, None, fit)
    frozen = search(EEPConfig(experts=2, population=6, elite=2, prune_generations=1, merge_generations=6,
                              noise_prob=0.5, noise_scale=0.2, freeze_route=True), layers, e, 2, None, fit)
    assert any(m.kept_routes() is None for m in free.maps.values())  # routes evolved: not one-hot any more
    assert all(m.kept_routes() is not None for m in frozen.maps.values())
    assert any(one_hot_rows(m.merge) is None for m in frozen.maps.values())  # experts were merged


def test_plan_round_trip_and_rejections(tmp_path):
    maps = {l: LayerMaps.select([0, 3], 6, 2) for l in IDENT.moe_layers}
    plan = EEPPlan(IDENT, maps, EEPConfig(experts=2), {"train": -1.0, "unpruned_train": -0.9})
    path = plan.save(tmp_path / "p.json")
    back = EEPPlan.load(path)
    assert back.discrete and back.num_kept == 2 and back.identity == IDENT
    assert all(torch.equal(back.layers[l].merge, maps[l].merge) for l in maps)
    other = MoEIdentity("MixtralForCausalLM", 3, (0, 1, 2), 8, 2, 16, 8, True, False)
    with pytest.raises(ConfigError, match="num_experts: plan 6, model 8"):
        IDENT.check(other, "EEP plan")
    bad = json.loads(path.read_text())
    del bad["layers"]["1"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="missing"):
        EEPPlan.load(tmp_path / "bad.json")
    (tmp_path / "x.json").write_text('{"method": "moa"}')
    with pytest.raises(ConfigError, match="not an EEP plan"):
        EEPPlan.load(tmp_path / "x.json")
    with pytest.raises(ConfigError, match="experts must be >= 1"):
        EEPConfig(experts=0)
    with pytest.raises(ConfigError, match="active"):
        EEPConfig(experts=2, active=3)

"""FrameFusion's building blocks and reducers against hand-computed cases and float64 references."""
from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.contracts.token_reduction import VideoGrid, VisionSpan
from overdrive.framefusion.config import FrameFusionConfig
from overdrive.framefusion.merging import (apply_merge, importance_proxy, predecessors, prune_keep, pruning_ratio,
                                           similarity_to_predecessor)
from overdrive.framefusion.method import METHOD


# -- independent float64 references ---------------------------------------------------------------
def ref_merge(h: torch.Tensor, patch: list[int], threshold: float):
    """One merge step written out token by token in float64: (kept indices, kept hidden, #merged)."""
    h = h.double()
    last: dict[int, int] = {}
    pred = []
    for i, p in enumerate(patch):
        pred.append(last.get(p, -1) if p >= 0 else -1)
        if p >= 0:
            last[p] = i
    merge = []
    for i, j in enumerate(pred):
        if j < 0:
            merge.append(False)
            continue
        cos = float(h[i] @ h[j] / (h[i].norm() * h[j].norm()))
        merge.append(cos >= threshold)
    root: dict[int, int] = {}
    for i, j in enumerate(pred):
        if merge[i]:
            root[i] = root[j] if merge[j] else j
    groups = defaultdict(list)
    for i, r in root.items():
        groups[r].append(i)
    keep = [i for i in range(len(patch)) if not merge[i]]
    out = torch.stack([torch.stack([h[i]] + [h[j] for j in groups[i]]).mean(0) for i in keep])
    return keep, out, sum(merge)


def ref_pruning_ratio(ratios, cost, L):
    """p by bisection on the cost equation (independent of the closed form)."""
    s, spent = 1.0, 0.0
    for r in ratios:
        s *= 1 - r
        spent += s

    def total(p):
        return (spent + (L - len(ratios)) * s * (1 - p)) / L

    if total(0.0) <= cost:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > cost else (lo, mid)
    return (lo + hi) / 2


# -- building blocks ------------------------------------------------------------------------------
def test_predecessors_hand_computed():
    patch = torch.tensor([-1, 0, 1, 0, 1, -1, 0, 1])
    assert predecessors(patch).tolist() == [-1, -1, -1, 1, 2, -1, 3, 4]
    assert predecessors(torch.tensor([-1, -1])).tolist() == [-1, -1]
    assert predecessors(torch.tensor([3])).tolist() == [-1]


def test_similarity_matches_float64():
    torch.manual_seed(0)
    h = torch.randn(12, 7)
    patch = torch.tensor([-1] + [i % 3 for i in range(10)] + [-1])
    pred = predecessors(patch)
    sim = similarity_to_predecessor(h, pred)
    for i in range(12):
        j = int(pred[i])
        if j < 0:
            assert sim[i] == float("-inf")
        else:
            want = float(h[i].double() @ h[j].double() / (h[i].double().norm() * h[j].double().norm()))
            assert abs(float(sim[i]) - want) < 1e-6


def test_merge_hand_computed_runs_average_into_the_first():
    # one patch, four frames: frames 1 and 2 repeat frame 0, frame 3 differs
    h = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
    patch = torch.zeros(4, dtype=torch.long)
    pred = predecessors(patch)
    merge = similarity_to_predecessor(h, pred) >= 0.9
    assert merge.tolist() == [False, True, True, False]
    keep, out = apply_merge(h, merge, pred)
    assert keep.tolist() == [0, 3]
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # (1+1+1)/3, (0+.1-.1)/3


def test_merge_matches_float64_reference_on_random_videos():
    rng = torch.Generator().manual_seed(1)
    for trial in range(20):
        frames, tpf, d = 2 + trial % 5, 1 + trial % 4, 8
        base = torch.randn(tpf, d, generator=rng)
        vid = torch.stack([base + 0.6 * t * torch.randn(tpf, d, generator=rng) for t in range(frames)])
        text0, text1 = torch.randn(2, d, generator=rng), torch.randn(3, d, generator=rng)
        h = torch.cat([text0, vid.reshape(-1, d), text1])
        patch = [-1, -1] + [i % tpf for i in range(frames * tpf)] + [-1, -1, -1]
        for thr in (0.3, 0.6, 0.9):
            pred = predecessors(torch.tensor(patch))
            merge = similarity_to_predecessor(h, pred) >= thr
            keep, out = apply_merge(h, merge, pred)
            rkeep, rout, _ = ref_merge(h, patch, thr)
            assert keep.tolist() == rkeep
            assert torch.allclose(out.double(), rout, atol=1e-6)
            assert all(i in keep.tolist() for i in range(2 + tpf))  # text and frame 0 are never merged away


def test_pruning_ratio_closed_form():
    assert pruning_ratio([], 0.3, 28) == pytest.approx(0.7)
    # L=4, cost .3, one merge step removing half: 0.5 + 3 * 0.5 * (1 - p) = 1.2 -> p = 8/15
    assert pruning_ratio([0.5], 0.3, 4) == pytest.approx(8 / 15)
    assert pruning_ratio([0.9, 0.9], 0.9, 4) == 0.0      # merging alone is under budget
    assert pruning_ratio([0.0, 0.0, 0.0], 0.3, 4) == 1.0  # overspent: clamped
    assert pruning_ratio([0.2], 0.5, 1) == 0.0           # no layer left
    rnd = random.Random(0)
    for _ in range(200):
        L = rnd.randint(2, 80)
        ratios = [rnd.uniform(0, 0.5) for _ in range(rnd.randint(0, min(5, L - 1)))]
        cost = rnd.uniform(0.05, 1.0)
        assert pruning_ratio(ratios, cost, L) == pytest.approx(ref_pruning_ratio(ratios, cost, L), abs=1e-9)


def test_pruning_ratio_uses_the_real_layer_count():
    # the reference hard-codes 28 layers; with the model's depth the answer differs
    assert pruning_ratio([0.3], 0.3, 28) != pytest.approx(pruning_ratio([0.3], 0.3, 36))


def test_prune_keep_removes_the_least_important_vision_tokens_only():
    imp = torch.tensor([0.0, 0.5, 0.1, 0.9, 0.2, 0.0])
    vis = torch.tensor([False, True, True, True, True, False])
    assert prune_keep(imp, vis, 2).tolist() == [0, 1, 3, 5]
    assert prune_keep(imp, vis, 10).tolist() == [0, 5]


def test_importance_proxies_match_float64():
    torch.manual_seed(2)
    x = torch.randn(10, 16) * torch.rand(10, 1) * 5
    xd = x.double()
    xn = xd / xd.pow(2).mean(-1, keepdim=True).sqrt()
    want = (xn - xn.mean(0)).norm(dim=-1)
    assert torch.allclose(importance_proxy(x, "deviation").double(), want, atol=1e-5)
    assert torch.allclose(importance_proxy(x, "norm").double(), xd.norm(dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="unknown importance proxy"):
        importance_proxy(x, "attention")


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,field", [
    ({"cost": 0.0}, "cost"), ({"cost": 1.5}, "cost"), ({"cost": -0.1}, "cost"), ({"cost": float("nan")}, "cost"),
    ({"similarity_lower_bound": -0.1}, "similarity_lower_bound"), ({"ratio_lower_bound": -1.0}, "ratio_lower_bound"),
    ({"importance": "attention"}, "importance"), ({"ratio": 0.2}, "unknown option"),
])
def test_config_rejects_out_of_range_options(opts, field):
    with pytest.raises(ConfigError, match=field):
        FrameFusionConfig.from_dict(opts)


def test_config_defaults_and_family_thresholds():
    cfg = FrameFusionConfig()
    assert (cfg.cost, cfg.ratio_lower_bound) == (0.3, 0.1)
    assert METHOD.resolve(cfg, "qwen2_vl").similarity_lower_bound == 0.5
    assert METHOD.resolve(cfg, "llava_onevision").similarity_lower_bound == 0.6
    assert METHOD.resolve(cfg.replace(similarity_lower_bound=0.8), "qwen2_vl").similarity_lower_bound == 0.8
    assert FrameFusionConfig.from_json(cfg.to_json()) == cfg


# -- the per-layer reducer ------------------------------------------------------------------------
def onehot_video(frames: int, tpf: int, repeat_patches: set[int], text_before: int = 1, text_after: int = 1):
    """Hidden states where patches in ``repeat_patches`` repeat frame 0 exactly and every other token
    is an orthogonal one-hot vector (cosine 0); returns (hidden, spans, token ids)."""
    n = text_before + frames * tpf + text_after
    h = torch.zeros(n, n + 1)
    for i in range(n):
        h[i, i] = 1.0
    for t in range(1, frames):
        for p in repeat_patches:
            h[text_before + t * tpf + p] = h[text_before + p]
    spans = [VisionSpan(text_before, VideoGrid(frames, 1, tpf))]
    return h, spans


def run_layers(reducer, hiddens, num_layers, importance_of):
    """Drive a reducer as an adapter would; the 'layers' are the identity. ``importance_of(b, h)``."""
    def probe(samples, hs, keeps):
        return [importance_of(b, h) for b, h in zip(samples, hs)]

    for layer in range(num_layers):
        red = reducer.step(layer, hiddens, probe)
        if red is not None:
            hiddens = [r.hidden for r in red]
    return hiddens


def by_identity(table):
    """Importance looked up from each token's one-hot identity (argmax of its hidden state)."""
    return lambda b, h: torch.tensor([table[int(i)] for i in h.argmax(-1)], dtype=torch.float32)


def test_reducer_hand_computed_merge_then_prune():
    # L=4, cost .5, one video 4 frames x 4 patches; patches 0 and 1 repeat (6 merges at layer 0)
    h, spans = onehot_video(4, 4, {0, 1})
    cfg = FrameFusionConfig(cost=0.5, similarity_lower_bound=0.5)
    red = METHOD.layerwise(cfg, 4, [spans], [h.shape[0]])
    importance = {i: float(i) for i in range(h.shape[0])}  # later tokens more important
    out = run_layers(red, [h], 4, by_identity(importance))
    s = red.summary()[0]
    # layer 0: r = 6/16 (< ub .5) -> 10 left; layer 1: nothing merges (r = 0 < .1) -> prune next;
    # layer 2: p = 1 - (2 - .625 - .625) / (2 * .625) = .4 -> round(4.0) = 4 pruned -> 6 left
    assert s["per_layer"] == [10, 10, 6, 6]
    assert (s["merged"], s["pruned"]) == (6, 4)
    assert s["merge_ratios"] == [0.375, 0.0]
    assert s["cost"] == pytest.approx(0.5)
    # survivors: text (0, 17), the two merged roots (1, 2) lose to later tokens: the 4 lowest-importance
    # vision tokens among {1, 2, 3, 4, 7, 8, 11, 12, 15, 16} are 1, 2, 3, 4
    assert sorted(int(i) for i in out[0].argmax(-1)) == [0, 7, 8, 11, 12, 15, 16, 17]


def test_reducer_caps_merging_at_the_budget():
    # cost .5, L=4: ub at layer 0 is .5 -> 8 of 16 tokens; 12 candidates -> only 8 merge, then done
    h, spans = onehot_video(4, 4, {0, 1, 2, 3})
    red = METHOD.layerwise(FrameFusionConfig(cost=0.5, similarity_lower_bound=0.5), 4, [spans], [h.shape[0]])
    run_layers(red, [h], 4, by_identity(defaultdict(float)))
    s = red.summary()[0]
    assert s["per_layer"] == [8, 8, 8, 8] and (s["merged"], s["pruned"]) == (8, 0)
    assert s["cost"] == pytest.approx(0.5)


def test_reducer_budget_guard_prunes_at_once_when_later_layers_cannot_recover():
    # L=2, cost .3: merging 4/16 at layer 0 leaves .75 > L*cost = .6, so layer 0 merges and prunes
    h, spans = onehot_video(4, 4, {0})
    red = METHOD.layerwise(FrameFusionConfig(cost=0.3, similarity_lower_bound=0.5), 2, [spans], [h.shape[0]])
    run_layers(red, [h], 2, by_identity({i: float(i) for i in range(h.shape[0])}))
    s = red.summary()[0]
    assert s["per_layer"] == [5, 5]  # round(.7 * 16) = 11 removed: 3 merged + 8 pruned
    assert (s["merged"], s["pruned"]) == (3, 8)


def test_reducer_without_video_is_a_no_op():
    red = METHOD.layerwise(FrameFusionConfig(), 3, [[]], [5])
    assert red.done
    h = torch.randn(5, 4)
    assert red.step(0, [h], lambda *a: pytest.fail("no probe without video")) is None


def test_reducer_rejects_bad_spans():
    with pytest.raises(ValueError, match="exceeds the sequence length"):
        METHOD.layerwise(FrameFusionConfig(), 2, [[VisionSpan(3, VideoGrid(2, 2, 2))]], [6])


def _random_case(rng: torch.Generator, frames: int, tpf: int, d: int = 24):
    base = torch.randn(tpf, d, generator=rng)
    drift = torch.rand(tpf, 1, generator=rng) * 1.2
    vid = torch.stack([base + drift * t * torch.randn(tpf, d, generator=rng) / math.sqrt(d) * 3
                       for t in range(frames)]).reshape(-1, d)
    text = torch.randn(4, d, generator=rng)
    h = torch.cat([text[:2], vid, text[2:]])
    return h, [VisionSpan(2, VideoGrid(frames, 1, tpf))]


@pytest.mark.parametrize("seed", range(12))
def test_reducer_reaches_the_cost_target_within_half_a_token(seed):
    """Tolerance: every merge step is exact, and each of the at most two rounding events (a capped
    merge / guard / prune step) moves the count by at most half a token for the remaining layers, so
    |achieved - cost| <= 0.5 / N for N vision tokens (one event at most changes the count after it)."""
    rng = torch.Generator().manual_seed(seed)
    pyr = random.Random(seed)
    frames, tpf = pyr.randint(2, 12), pyr.randint(2, 30)
    L = pyr.choice([2, 3, 4, 8, 24, 28, 36])
    cfg = FrameFusionConfig(cost=pyr.choice([0.1, 0.2, 0.3, 0.5, 0.8]),
                            similarity_lower_bound=pyr.choice([0.3, 0.5, 0.6, 0.8]))
    h, spans = _random_case(rng, frames, tpf)
    red = METHOD.layerwise(cfg, L, [spans], [h.shape[0]])

    def layer(x):  # a "layer": small random drift, like a residual update
        return x + 0.05 * torch.randn(x.shape, generator=rng)

    def probe(samples, hs, keeps):
        return [hh.float().sum(-1) for hh in hs]

    hs = [h]
    for li in range(L):
        r = red.step(li, hs, probe)
        if r is not None:
            hs = [x.hidden for x in r]
        hs = [layer(x) for x in hs]
    s = red.summary()[0]
    N = frames * tpf
    assert s["cost"] is not None
    assert abs(s["cost"] - cfg.cost) <= 0.5 / N + 1e-9, s
    assert all(a >= b for a, b in zip(s["per_layer"], s["per_layer"][1:]))  # tokens never come back
    assert s["per_layer"][0] + s["merged"] + s["pruned"] >= N - 0  # bookkeeping is consistent
    assert N - s["per_layer"][-1] == s["merged"] + s["pruned"]


def test_reducer_batch_state_is_per_sample():
    rng = torch.Generator().manual_seed(7)
    h1, sp1 = _random_case(rng, 6, 9)
    h2, sp2 = onehot_video(5, 3, {0, 2})
    h2 = torch.nn.functional.pad(h2, (0, h1.shape[1] - h2.shape[1])) if h2.shape[1] < h1.shape[1] else h2[:, :h1.shape[1]]
    cfg = FrameFusionConfig(cost=0.4, similarity_lower_bound=0.6)

    def probe(samples, hs, keeps):
        return [hh.float().sum(-1) for hh in hs]

    def run(items):
        red = METHOD.layerwise(cfg, 6, [s for _, s in items], [h.shape[0] for h, _ in items])
        hs = [h for h, _ in items]
        for li in range(6):
            r = red.step(li, hs, probe)
            if r is not None:
                hs = [x.hidden for x in r]
        return hs, red.summary()

    both, sb = run([(h1, sp1), (h2, sp2)])
    one, s1 = run([(h1, sp1)])
    two, s2 = run([(h2, sp2)])
    assert torch.equal(both[0], one[0]) and torch.equal(both[1], two[0])
    assert sb == s1 + s2


# -- before the decoder ---------------------------------------------------------------------------
def test_select_hand_computed():
    # 3 frames x 2 patches; patch 0 repeats, patch 1 changes; keep 3 of 6
    e = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0],
                      [1.0, 0, 0, 0], [0, 0, 1.0, 0],
                      [1.0, 0, 0, 0], [0, 0, 0, 5.0]])
    cfg = FrameFusionConfig(similarity_lower_bound=0.9, importance="norm", weight_merged=False)
    sel = METHOD.select(e, VideoGrid(3, 1, 2), 3, cfg)
    # merging removes tokens 2 and 4 (into 0); one more must go: the lowest-norm of {0, 1, 3, 5}
    # is a tie at norm 1 among 0, 1, 3 -> the earliest (0) is pruned
    assert sel.keep.tolist() == [1, 3, 5] and (sel.merged, sel.pruned) == (2, 1)
    assert torch.equal(sel.embeds, e[[1, 3, 5]])
    # weighted by run size: token 0 stands for 3 tokens (score 3), 1 and 3 for one (score 1) -> 1 goes
    sel = METHOD.select(e, VideoGrid(3, 1, 2), 3, cfg.replace(weight_merged=True))
    assert sel.keep.tolist() == [0, 3, 5] and (sel.merged, sel.pruned) == (2, 1)
    assert torch.equal(sel.embeds, e[[0, 3, 5]])


def test_select_caps_merges_at_the_budget_and_averages():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, 0.4], [1.0, 0.6]])  # one patch, 4 frames, all similar
    sel = METHOD.select(e, VideoGrid(4, 1, 1), 3, FrameFusionConfig(similarity_lower_bound=0.5))
    # one merge allowed: the most similar pair; cos(t1,t0)=1/1.0198=.9806,
    # cos(t2,t1)=1.08/(1.0198*1.0770)=.9833, cos(t3,t2)=1.24/(1.0770*1.1662)=.9873 -> t3 into t2
    assert sel.keep.tolist() == [0, 1, 2] and (sel.merged, sel.pruned) == (1, 0)
    assert torch.allclose(sel.embeds[2], torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("seed", range(6))
def test_select_returns_exactly_num_keep_with_float64_means(seed):
    rng = torch.Generator().manual_seed(seed)
    frames, rows, cols = 2 + seed, 3, 4
    h, _ = _random_case(rng, frames, rows * cols)
    emb = h[2:-2]
    n = emb.shape[0]
    for keep in (1, n // 3, n // 2, n):
        sel = METHOD.select(emb, VideoGrid(frames, rows, cols), keep, FrameFusionConfig(similarity_lower_bound=0.5))
        assert sel.keep.numel() == keep == sel.embeds.shape[0]
        assert sel.keep.tolist() == sorted(set(sel.keep.tolist()))
        assert sel.merged + sel.pruned == n - keep
        if sel.merged == 0:
            assert torch.equal(sel.embeds, emb[sel.keep])
    # a single merge round equals the float64 reference when the budget is not binding
    patch = [i % (rows * cols) for i in range(n)]
    rkeep, rout, m = ref_merge(emb, patch, 0.5)
    cfg = FrameFusionConfig(similarity_lower_bound=0.5, ratio_lower_bound=1.0)  # stop after one round
    sel = METHOD.select(emb, VideoGrid(frames, rows, cols), n - m, cfg)
    assert sel.keep.tolist() == rkeep and torch.allclose(sel.embeds.double(), rout, atol=1e-6)


def test_select_rejects_bad_shapes():
    with pytest.raises(ValueError, match="do not match the grid"):
        METHOD.select(torch.randn(5, 4), VideoGrid(2, 1, 2), 2, FrameFusionConfig())
    with pytest.raises(ValueError, match="num_keep"):
        METHOD.select(torch.randn(4, 4), VideoGrid(2, 1, 2), 0, FrameFusionConfig())

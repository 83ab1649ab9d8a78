"""MoA calibration: the influence formula vs the exact loss change of masking an entry (float64, a loss linear in
the attention so first order is exact) and vs autograd through eager attention; candidate losses vs a brute-force
sum over the dropped entries; the milp selection vs exhaustive search; the pipeline and its option errors on the
tiny Llama."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import HeadSpans, ModelIdentity
from overdrive.moa.calibrate import (CalibOptions, calibrate, candidate_density, candidate_losses, candidates,
                                     influence_chunks, select)
from overdrive.testing import tiny_llama


def _attention(q, k, v, scale, drop=None):
    """float64 causal softmax attention (B, H, N, D), GQA by repetition; ``drop`` = (head, i, j) masked."""
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    n = q.shape[2]
    s = (q @ kk.transpose(-1, -2)) * scale
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(q.shape[0], q.shape[1], 1, 1)
    if drop is not None:
        mask[:, drop[0], drop[1], drop[2]] = False
    a = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return a, a @ vv


def _setup(seed=0, b=2, hq=4, hk=2, n=11, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(b, n, hq, d, generator=g, dtype=torch.float64)  # loss = sum(w * O): linear in A
    return q, k, v, w


def _influence(q, k, v, w, scale):
    """I (B, Hq, N, N) per query head from the code under test (batch 1 at a time, no GQA summation)."""
    out = _attention(q, k, v, scale)[1].transpose(1, 2)
    hq = q.shape[1]
    rows = []
    for bi in range(q.shape[0]):
        per_head = []
        for h in range(hq):  # one query head at a time against its own KV head: no group sum
            kh = h // (hq // k.shape[1])
            _, _, infl = next(influence_chunks(q[bi:bi + 1, h:h + 1], k[bi:bi + 1, kh:kh + 1], v[bi:bi + 1, kh:kh + 1],
                                               out[bi:bi + 1, :, h:h + 1], w[bi:bi + 1, :, h:h + 1], scale))
            per_head.append(infl[0])
        rows.append(torch.stack(per_head))
    return torch.stack(rows)


def test_influence_is_the_exact_loss_change_for_a_loss_linear_in_attention():
    q, k, v, w = _setup()
    scale = 0.4
    infl = _influence(q, k, v, w, scale)
    base = (w * _attention(q, k, v, scale)[1].transpose(1, 2)).sum(dim=(1, 2, 3))  # per batch row
    for h, i, j in [(0, 5, 2), (3, 10, 0), (1, 7, 7), (2, 3, 1)]:
        masked = (w * _attention(q, k, v, scale, drop=(h, i, j))[1].transpose(1, 2)).sum(dim=(1, 2, 3))
        torch.testing.assert_close(infl[:, h, i, j], masked - base, rtol=1e-9, atol=1e-12)
    assert infl[:, :, 2, 5].abs().max() == 0  # above the diagonal: nothing to mask


def test_attention_gradient_matches_autograd_through_eager_attention():
    """g = dL/dA from autograd on an explicit softmax matrix: I from it equals the code's I (summed over GQA)."""
    q, k, v, w = _setup(seed=1, n=9)
    scale = 0.3
    a, _ = _attention(q, k, v, scale)
    a = a.detach().requires_grad_(True)
    vv = v.repeat_interleave(2, 1)
    loss = (w * (a @ vv).transpose(1, 2)).sum()
    loss.backward()
    g = a.grad
    want = -a * (g - (a * g).sum(-1, keepdim=True)) / (1 - a)
    want = torch.nan_to_num(want.detach().masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), 0.0))
    out = (a.detach() @ vv).transpose(1, 2)
    _, _, got = next(influence_chunks(q, k, v, out, w, scale))
    torch.testing.assert_close(got, want.view(2, 2, 2, 9, 9).sum(dim=(0, 2)), rtol=1e-9, atol=1e-8)  # A = 1 at (0, 0): 1 - A clamped


def test_candidate_losses_sum_exactly_the_dropped_entries():
    q, k, v, w = _setup(seed=2, n=23)
    scale, sink = 0.35, 2
    spans = HeadSpans((0.0, 4.0, -3.0, 23.0), (0.5, 0.0, 0.75, 0.0), 3)
    out = _attention(q, k, v, scale)[1].transpose(1, 2)
    got = candidate_losses(q, k, v, out, w, scale, spans, sink)
    _, _, infl = next(influence_chunks(q, k, v, out, w, scale))  # (Hk, N, N)
    for h in range(2):
        for c, (a, b) in enumerate(zip(spans.alpha, spans.beta)):
            want = 0.0
            for i in range(23):
                s = min(i + 1, max(3, math.ceil(a + b * (i + 1))))
                for j in range(sink, i + 1 - s + sink):
                    want += float(infl[h, i, j])
            assert float(got[h, c]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert float(got[:, 3].abs().max()) == 0.0  # span 23 >= every length: drops nothing


def test_milp_selection_equals_exhaustive_search():
    g = torch.Generator().manual_seed(3)
    losses = [torch.randn(2, 2, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    dens = [torch.tensor([0.2, 0.4, 0.6, 1.0], dtype=torch.float64), torch.tensor([0.1, 0.3, 0.7, 1.0], dtype=torch.float64)]
    w = [0.3, 0.7]
    budget = 0.5
    best, best_val = None, float("inf")
    for combo in itertools.product(range(4), repeat=4):
        if any(sum(float(d[c]) for c in combo) / 4 > budget for d in dens):
            continue
        val = sum(wi * sum(float(l.reshape(4, 4)[u, c]) for u, c in enumerate(combo)) for wi, l in zip(w, losses))
        if val < best_val:
            best, best_val = combo, val
    chosen = select(losses, dens, budget, w)
    assert [c for row in chosen for c in row] == list(best)
    with pytest.raises(ConfigError, match="--density 0.05 cannot be met"):
        select(losses, dens, 0.05, w)


def test_candidate_grid_and_density():
    opts = CalibOptions(max_len=160, lengths=(64, 128), validate_length=96, sink=4, min_span=16).resolve(2048)
    cands = candidates(opts)
    assert len(cands) == 7 * 9 and (0.0, 1.0) in cands and (-20.0, 0.0) in cands  # alpha step 160/16 = 10
    d = candidate_density(cands, 64, opts)
    full = cands.index((0.0, 1.0))
    assert float(d[full]) == 1.0
    fixed = cands.index((20.0, 0.0))  # span max(16, 20) = 20 once N >= 20
    want = sum(min(n, 20) for n in range(1, 65)) / (64 * 65 / 2)
    assert float(d[fixed]) == pytest.approx(want)


@pytest.mark.parametrize("kw, message", [
    ({"density": 0.0}, r"--density must be in \(0, 1\]"),
    ({"max_len": 4096}, "--max-len 4096 exceeds the model's context"),
    ({"lengths": (64, 3000)}, "--lengths 3000 must be above"),
    ({"validate_length": 64, "lengths": (64, 128)}, "must differ from the profile lengths"),
    ({"sink": 8, "min_span": 4}, r"--min-span \(4\) must be >= max\(1, --sink = 8\)"),
    ({"target": "gold"}, r"--target must be one of \('dense', 'text'\)"),
])
def test_option_errors_name_the_option(kw, message):
    with pytest.raises(ConfigError, match=message):
        CalibOptions(**kw).resolve(2048)


def test_calibrate_in_process_meets_the_budget_at_every_length():
    from overdrive.contracts.llm_calibration import load_for_calibration

    run = load_for_calibration(tiny_llama(), device="cpu", dtype="float32")
    model = run.model
    opts = CalibOptions(density=0.5, max_len=160, lengths=(64, 128), validate_length=96, samples=1, sink=4,
                        min_span=8, response_tokens=8)
    plan = calibrate(run, opts)
    run.close()
    assert plan.identity == ModelIdentity.from_hf_config(model.config)
    for n in (64, 128, 160):
        assert plan.density_at(n) <= 0.5 + 1e-9
        assert plan.calibration["density_at"][str(n)] == pytest.approx(plan.density_at(n))
    val = plan.calibration["validation"]
    assert val["plans"][val["chosen"]]["loss"] == min(p["loss"] for p in val["plans"])
    # the widest uniform spans within the same budget were validated too; the lowest loss of all was written
    assert val["uniform"] and set(val["uniform"]) <= {"streamingllm", "uniform-elastic"}
    losses = {"moa": val["plans"][val["chosen"]]["loss"], **val["uniform"]}
    assert val["result"] == min(losses, key=losses.get)
    if val["result"] != "moa":
        assert len({(a, b) for layer in plan.layers for a, b in zip(layer["alpha"], layer["beta"])}) == 1
    assert plan.sink == 4 and plan.min_span == 8 and len(plan.layers) == 2
    assert model.config._attn_implementation == "sdpa"  # the probe restored the model's attention


def test_uniform_references_are_the_widest_spans_within_the_budget():
    from overdrive.moa.calibrate import uniform_references

    ident = ModelIdentity.from_hf_config(__import__("transformers").AutoConfig.from_pretrained(tiny_llama()))
    opts = CalibOptions(density=0.5, max_len=160, lengths=(64, 128), validate_length=96, sink=4,
                        min_span=8).resolve(2048)
    lengths = (64, 128, 160)
    refs = uniform_references(ident, opts, lengths)
    assert set(refs) == {"streamingllm", "uniform-elastic"}
    w = refs["streamingllm"].layers[0]["alpha"][0]
    beta = refs["uniform-elastic"].layers[0]["beta"][0]
    for name, p in refs.items():
        assert max(p.density_at(n) for n in lengths) <= 0.5 + 1e-9
    # one position wider (window) or 1e-6 more beta: over budget at some length (closed-form density check)
    from overdrive.moa.config import uniform_plan
    assert max(uniform_plan(ident, w + 1, 0.0, sink=4, min_span=8).density_at(n) for n in lengths) > 0.5
    assert max(uniform_plan(ident, 0.0, beta + 1e-6, sink=4, min_span=8).density_at(n) for n in lengths) > 0.5
    # a budget no span can meet leaves the references out
    tight = CalibOptions(density=0.05, max_len=160, lengths=(64, 128), validate_length=96, sink=4,
                         min_span=8).resolve(2048)
    assert uniform_references(ident, tight, lengths) == {}


def test_data_files(tmp_path):
    from transformers import AutoTokenizer

    from overdrive.moa.calibrate import _context_ids

    tok = AutoTokenizer.from_pretrained(tiny_llama())
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "the quick brown fox"}\n\n{"text": "jumps over"}\n')
    want = tok("the quick brown fox\n\njumps over", return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert torch.equal(_context_ids(tok, str(good)), want)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    with pytest.raises(ConfigError, match=r"b.jsonl:2: expected an object with a string 'text'"):
        _context_ids(tok, str(bad))
    with pytest.raises(ConfigError, match="--data .*missing.txt: file not found"):
        _context_ids(tok, str(tmp_path / "missing.txt"))


def test_samples_text_target_and_dense_target():
    """``text``: the stream itself (wrapping); ``dense``: the context followed by the dense model's greedy tokens."""
    from transformers import AutoModelForCausalLM

    from overdrive.contracts.llm_calibration import load_for_calibration
    from overdrive.moa.calibrate import make_samples

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32)
    run = load_for_calibration(model, device="cpu")
    stream = torch.arange(3, 103)
    opts = CalibOptions(max_len=160, lengths=(64, 128), validate_length=96, samples=3, batch_size=2, response_tokens=8,
                        target="text", sink=4, min_span=8).resolve(2048)
    got = torch.cat(make_samples(run, stream, 40, opts, offset=90))
    assert torch.equal(got.flatten(), stream.repeat(3)[90:90 + 120])
    dense = torch.cat(make_samples(run, stream, 40, dataclasses.replace(opts, target="dense"), offset=0))
    assert torch.equal(dense[:, :32].flatten(), stream.repeat(2)[:96])
    want = model.generate(dense[:1, :32], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(dense[:1], want)

"""MoA's KV-cache contract implementation: formats per tensor-parallel rank, the paged ``attend``/``store`` over an
engine-like schedule (rows joining mid-generation, a chunked prefill, a prefix-cache-like continuation, GQA) vs a
float64 reference written here from the rule, and the plan's validation messages."""
from __future__ import annotations

import math

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import ModelIdentity, PagedBatch
from overdrive.moa import MoAPlan, make_plan, uniform_plan
from overdrive.moa.method import METHOD

IDENT = ModelIdentity("LlamaForCausalLM", 2, 6, 2, 40)


def _span(a: float, b: float, n: int, min_span: int) -> int:
    return min(n, max(min_span, math.ceil(a + b * n)))


def test_formats_per_rank_and_density():
    plan = make_plan(IDENT, [[4.0, -8.0], [0.0, 16.0]], [[0.25, 0.5], [1.0, 0.0]], sink=2, min_span=4)
    full = METHOD.layer_formats(plan, IDENT)
    assert [f.layer for f in full] == [0, 1] and all(f.dense and f.cell_bytes == 0 and f.sink == 2 for f in full)
    assert full[0].head_spans.alpha == (4.0, -8.0) and full[1].head_spans.beta == (1.0, 0.0)
    r1 = METHOD.layer_formats(plan, IDENT, tp_rank=1, tp_size=2)
    assert r1[0].num_kv_heads == 1 and r1[0].head_spans.alpha == (-8.0,) and r1[1].head_spans.beta == (0.0,)
    r3 = METHOD.layer_formats(plan, IDENT, tp_rank=3, tp_size=4)  # 2 KV heads over 4 ranks: replicated
    assert r3[1].head_spans.alpha == (16.0,)
    # density: fraction of causal entries read, averaged over layers and heads (closed form per head)
    n = 50
    per = [sum(_span(a, b, t, 4) for t in range(1, n + 1)) / (n * (n + 1) / 2)
           for a, b in [(4.0, 0.25), (-8.0, 0.5), (0.0, 1.0), (16.0, 0.0)]]
    assert plan.density_at(n) == pytest.approx(sum(per) / 4)
    assert per[2] == 1.0


@pytest.mark.parametrize("change, message", [
    ({"model": {**IDENT.to_dict(), "num_kv_heads": 3}}, r"layers\[0\].alpha must be a list of 3 numbers"),
    ({"sink": 5, "min_span": 4}, r"min_span must be an integer >= max\(1, sink = 5\)"),
    ({"layers": [{"alpha": [0, 0], "beta": [0, 0]}]}, "1 entries for a model of 2 layers"),
    ({"layers": [{"alpha": [0, float("nan")], "beta": [0, 0]}] * 2}, r"alpha\[1\] must be a finite number"),
    ({"layers": [{"alpha": [0, 0], "beta": [0, 0], "gamma": 1}] * 2}, r"unknown keys \['gamma'\]"),
    ({"format": "overdrive.pmkvq.plan"}, "not a MoA plan"),
    ({"density": 1.5}, r"density must be in \[0, 1\]"),
])
def test_plan_validation_names_the_field(change, message):
    base = uniform_plan(IDENT, 8.0, 0.5, sink=2, min_span=4).to_dict()
    with pytest.raises(ConfigError, match=message):
        MoAPlan.from_dict({**base, **change})


def test_plan_round_trip_and_other_model(tmp_path):
    plan = uniform_plan(IDENT, 8.0, 0.5, sink=2, min_span=4)
    plan.save(tmp_path / "p.json")
    assert METHOD.load_config(str(tmp_path / "p.json")) == plan
    with pytest.raises(ConfigError, match="num_layers: plan 2 vs model 3"):
        METHOD.layer_formats(plan, ModelIdentity("LlamaForCausalLM", 3, 6, 2, 40))


def test_paged_attend_matches_float64_reference_over_an_engine_schedule():
    """Steps mixing prompts, decodes, a chunked prefill and a row that joins late (block size 8, head size 40,
    GQA 3): each step's output vs float64 attention over the row's history with the span rule."""
    torch.manual_seed(0)
    hq, hk, d, bs, sink, min_span = 6, 2, 40, 8, 3, 5
    ident = ModelIdentity("LlamaForCausalLM", 1, hq, hk, d)
    alpha, beta = [3.0, -6.0], [0.25, 0.625]
    fmt = METHOD.layer_formats(make_plan(ident, [alpha], [beta], sink=sink, min_span=min_span), ident)[0]
    pages = torch.zeros(40, hk, bs, 2 * d * 4, dtype=torch.uint8)
    blocks = {0: [5, 9, 2, 7, 11, 3, 30], 1: [1, 8, 12, 4, 6, 10, 31], 2: [13, 14, 15, 16, 17, 18, 32]}
    hist = {r: (torch.zeros(0, hk, d, dtype=torch.float64), torch.zeros(0, hk, d, dtype=torch.float64)) for r in blocks}
    schedule = [{0: 19}, {0: 1, 1: 7}, {0: 1, 1: 12}, {0: 1, 1: 1, 2: 23}, {0: 6, 1: 1, 2: 1}, {0: 1, 1: 1, 2: 1}]
    scale, worst = d ** -0.5, 0.0
    for step in schedule:
        rows = list(step)
        qlens = [step[r] for r in rows]
        prev = [hist[r][0].shape[0] for r in rows]
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        table = torch.tensor([blocks[r] for r in rows], dtype=torch.int32)
        slots = torch.tensor([blocks[r][p // bs] * bs + p % bs for r, a, n in zip(rows, prev, qlens)
                              for p in range(a, a + n)])
        batch = PagedBatch(query_start_loc=torch.tensor(qsl), prev_lens=torch.tensor(prev), block_table=table,
                           slot_mapping=slots, host_query_start_loc=qsl, host_prev_lens=prev)
        n = qsl[-1]
        q, k, v = torch.randn(n, hq, d), torch.randn(n, hk, d) * 2, torch.randn(n, hk, d)
        out = METHOD.attend(fmt, pages, batch, q, k, v, scale)
        METHOD.store(fmt, pages, batch, k, v)  # what the adapter does after attend (idempotent)
        for i, r in enumerate(rows):
            a, b = qsl[i], qsl[i + 1]
            kh = torch.cat([hist[r][0], k[a:b].double()])
            vh = torch.cat([hist[r][1], v[a:b].double()])
            for j in range(b - a):
                t = prev[i] + j
                for h in range(hq):
                    g = h // (hq // hk)
                    s = _span(alpha[g], beta[g], t + 1, min_span)
                    keys = [p for p in range(t + 1) if p < sink or p >= t + 1 - s + sink]
                    w = torch.softmax(kh[keys, g] @ q[a + j, h].double() * scale, 0)
                    worst = max(worst, (out[a + j, h].double() - w @ vh[keys, g]).abs().max().item())
            hist[r] = (kh, vh)
    assert worst < 1e-5, worst
    # the cells hold the K/V written (K then V per cell, float32)
    cells = pages.view(torch.float32)
    p = 27
    assert torch.equal(cells[blocks[0][p // bs], :, p % bs, :d].double(), hist[0][0][p])
    assert torch.equal(cells[blocks[0][p // bs], :, p % bs, d:].double(), hist[0][1][p])


def test_attend_rejects_pages_of_another_dtype():
    ident = ModelIdentity("LlamaForCausalLM", 1, 2, 2, 8)
    fmt = METHOD.layer_formats(uniform_plan(ident, 4.0, 0.5, sink=1, min_span=2), ident)[0]
    pages = torch.zeros(4, 2, 4, 2 * 8 * 2, dtype=torch.uint8)  # bf16 cells
    batch = PagedBatch(query_start_loc=torch.tensor([0, 1]), prev_lens=torch.tensor([0]),
                       block_table=torch.tensor([[0]], dtype=torch.int32), slot_mapping=torch.tensor([0]))
    with pytest.raises(ConfigError, match="page cells hold 32 bytes, expected 64"):
        METHOD.attend(fmt, pages, batch, torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8), 1.0)

"""The influence benchmark's exact masked loss: its per-head mask is the span rule written out per query, and a
forward through the calibration layer without cuts is the model's own loss (a plain transformers forward)."""
from __future__ import annotations

import math

import pytest

import torch

from overdrive.benchmarks.moa_influence import masked_loss, span_mask
from overdrive.contracts.kv_cache import HeadSpans
from overdrive.testing import tiny_llama


def test_span_mask_is_the_rule_per_query():
    spans = HeadSpans((0.0, 5.0), (0.5, 0.0), 4)
    sink, n = 2, 19
    got = span_mask(spans, n, sink)
    for h, (a, b) in enumerate(zip(spans.alpha, spans.beta)):
        for i in range(n):
            s = min(i + 1, max(4, math.ceil(a + b * (i + 1))))
            for j in range(n):
                want = j <= i and (j < sink or j >= i + 1 - s + sink)
                assert bool(got[h, i, j]) == want, (h, i, j)


def test_masked_loss_without_cuts_is_the_model_loss_and_a_cut_changes_it():
    from transformers import AutoModelForCausalLM

    from overdrive.contracts.llm_calibration import load_for_calibration

    d = tiny_llama()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    run = load_for_calibration(d, device="cpu", dtype="float32")
    ident = run.geometry.identity
    ids = torch.randint(5, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lg = model(input_ids=ids).logits[0, -9:-1]
    want = float(torch.nn.functional.cross_entropy(lg, ids[0, -8:]))
    assert masked_loss(run, ids, 8, {}, 8, 2, ident) == pytest.approx(want, rel=1e-5, abs=1e-6)
    cut = masked_loss(run, ids, 8, {(1, 0): (0.0, 0.0)}, 8, 2, ident)
    assert abs(cut - want) > 1e-6  # a head reading only sink + 6 recent positions changes the loss
    run.close()


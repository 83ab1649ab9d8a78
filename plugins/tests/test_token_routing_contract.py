"""The token-routing contract: threshold in logit space, the shared per-request bookkeeping, and the
shared-tokenizer check (closed forms and hand-worked sequences)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from overdrive.contracts.token_routing import (RoutedSequence, RouterInputs, check_shared_tokenizer, route_mask,
                                               routing_stats, threshold_logit)


@pytest.mark.parametrize("t", [0.01, 0.2, 0.5, 0.7388, 0.99])
def test_threshold_logit_is_the_inverse_sigmoid(t):
    assert threshold_logit(t) == pytest.approx(math.log(t / (1 - t)), rel=1e-12, abs=1e-12)
    assert 1 / (1 + math.exp(-threshold_logit(t))) == pytest.approx(t, rel=1e-12)


def test_threshold_ends_route_everything_or_nothing_without_saturation():
    # sigmoid(40) == 1.0 and sigmoid(-120) == 0.0 in float32: a probability-space rule would route the
    # first at threshold 1 and drop the second at threshold 0
    z = torch.tensor([-1e30, -120.0, 0.0, 40.0, 1e30])
    assert torch.sigmoid(z[3]).item() == 1.0 and torch.sigmoid(z[1]).item() == 0.0
    assert route_mask(z, 0.0).tolist() == [True] * 5
    assert route_mask(z, 1.0).tolist() == [False] * 5
    assert route_mask(z, 0.5).tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        threshold_logit(bad)


def test_router_inputs_shapes_are_checked():
    RouterInputs(torch.zeros(3, 8), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="topk_logits"):
        RouterInputs(torch.zeros(3, 8), torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token"):
        RouterInputs(torch.zeros(3, 8), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def test_routed_sequence_feeds_each_model_what_it_has_not_seen():
    seq = RoutedSequence([1, 2, 3], max_new_tokens=5)
    assert seq.small_feed() == [1, 2, 3]               # the small model starts with the prompt
    assert not seq.accept(10, routed=False)
    assert seq.small_feed() == [10]                     # then one accepted token per step
    assert seq.large_feed() == [1, 2, 3, 10]            # first routed call: prompt + accepted tokens
    assert not seq.accept(20, routed=True)
    for tok in (21, 22):
        assert seq.small_feed() == [seq.tokens[-1]]
        assert not seq.accept(tok, routed=False)
    assert seq.small_feed() == [22]
    assert seq.large_feed() == [20, 21, 22]             # later: the gap since its last call, its own token first
    assert seq.accept(23, routed=True) is True          # 5 tokens: done
    assert seq.finish_reason == "length" and seq.tokens == [10, 20, 21, 22, 23]
    assert (seq.num_routed, seq.num_small) == (2, 3)
    with pytest.raises(RuntimeError):
        seq.accept(5, False)
    stopped = RoutedSequence([1], max_new_tokens=9, stop_token_ids={99})
    assert not stopped.accept(7, False) and stopped.accept(99, True) and stopped.finish_reason == "stop"
    assert routing_stats([seq, stopped]) == {"tokens": 7, "routed_tokens": 3, "small_tokens": 4,
                                             "routed_fraction": 3 / 7}


def test_routed_sequence_rejects_empty_prompt_and_zero_budget():
    with pytest.raises(ValueError):
        RoutedSequence([], 4)
    with pytest.raises(ValueError):
        RoutedSequence([1], 0)


def test_shared_tokenizer_check(tmp_path: Path):
    from transformers import PreTrainedTokenizerFast

    from overdrive.testing.llm import tiny_llama
    from overdrive.testing.tokenizer import save_tokenizer

    a = PreTrainedTokenizerFast.from_pretrained(tiny_llama())
    check_shared_tokenizer(a, PreTrainedTokenizerFast.from_pretrained(tiny_llama()), "s", "l")
    save_tokenizer(tmp_path / "other", vocab_size=400)
    b = PreTrainedTokenizerFast.from_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="small model SMALL-DIR and the large model LARGE-DIR differ: vocabularies"):
        check_shared_tokenizer(a, b, "SMALL-DIR", "LARGE-DIR")

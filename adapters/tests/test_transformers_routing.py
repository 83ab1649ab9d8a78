"""The transformers routing loop on the tiny pair: threshold 0 / 1 reproduce the large / small model's
greedy output, and any threshold equals a cache-free reference loop (full forwards every step)."""
from __future__ import annotations

import pytest
import torch

import overdrive.r2r as r2r
from overdrive.contracts.token_routing import RouterInputs, threshold_logit
from overdrive.testing.r2r import PROMPTS, tiny_r2r_pair, tiny_r2r_router

N = 20


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s, l = tiny_r2r_pair()
    small = AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32).eval()
    large = AutoModelForCausalLM.from_pretrained(l, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(s)
    return small, large, r2r.load_router(tiny_r2r_router(), s), [tok(p).input_ids for p in PROMPTS[:4]]


def greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def reference_loop(small, large, router, ids: list[int], threshold: float) -> tuple[list[int], list[bool], list[float]]:
    """R2R written directly: no caches, the whole context through each model at every step."""
    ctx, tokens, routed, scores = list(ids), [], [], []
    for _ in range(N):
        out = small(torch.tensor([ctx]), output_hidden_states=True)
        logits, hidden = out.logits[0, -1], out.hidden_states[-1][0, -1]
        tok = int(logits.argmax())
        z = float(router.scores(RouterInputs(hidden[None], logits.topk(router.topk).values[None], torch.tensor([tok])))[0])
        go = z >= threshold_logit(threshold)
        if go:
            tok = int(large(torch.tensor([ctx])).logits[0, -1].argmax())
        ctx.append(tok)
        tokens.append(tok)
        routed.append(go)
        scores.append(z)
    return tokens, routed, scores


def test_threshold_0_is_the_large_model_and_1_the_small_model(setup):
    small, large, router, prompts = setup
    for ids in prompts:
        all_large = r2r.generate(small, large, router, ids, max_new_tokens=N, threshold=0.0, ignore_eos=True)
        assert all_large.tokens == greedy(large, ids) and all(all_large.routed)
        all_small = r2r.generate(small, large, router, ids, max_new_tokens=N, threshold=1.0, ignore_eos=True)
        assert all_small.tokens == greedy(small, ids) and not any(all_small.routed)
        assert all_large.finish_reason == all_small.finish_reason == "length"


def test_router_threshold_equals_the_cache_free_reference(setup):
    small, large, router, prompts = setup
    mixed = 0
    for ids in prompts:
        out = r2r.generate(small, large, router, ids, max_new_tokens=N, ignore_eos=True)  # the router's threshold
        tokens, routed, scores = reference_loop(small, large, router, ids, router.threshold)
        assert out.tokens == tokens and out.routed == routed
        torch.testing.assert_close(torch.tensor(out.scores), torch.tensor(scores), rtol=1e-4, atol=1e-4)
        mixed += 0 < out.num_routed < N
    assert mixed >= 2  # the tiny router really mixes the two models on these prompts


def test_end_of_sequence_and_sampling(setup):
    small, large, router, prompts = setup
    ids = prompts[0]
    first = greedy(large, ids)[0]
    out = r2r.generate(small, large, router, ids, max_new_tokens=N, threshold=0.0, stop_token_ids=[first])
    assert out.tokens == [first] and out.finish_reason == "stop"
    a = r2r.generate(small, large, router, ids, max_new_tokens=N, temperature=0.8,
                     generator=torch.Generator().manual_seed(3))
    b = r2r.generate(small, large, router, ids, max_new_tokens=N, temperature=0.8,
                     generator=torch.Generator().manual_seed(3))
    assert a.tokens == b.tokens and a.routed == b.routed
    with pytest.raises(ValueError, match="one sequence"):
        r2r.generate(small, large, router, [ids, ids], max_new_tokens=2)


def test_router_folder_is_loaded_and_checked_for_the_small_model(setup):
    small, large, router, prompts = setup
    out = r2r.generate(small, large, tiny_r2r_router(), prompts[1], max_new_tokens=6, ignore_eos=True)
    ref = r2r.generate(small, large, router, prompts[1], max_new_tokens=6, ignore_eos=True)
    assert out.tokens == ref.tokens and out.routed == ref.routed

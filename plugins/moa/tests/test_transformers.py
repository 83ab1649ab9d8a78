"""MoA in transformers: the span cache (per-head paged buffers + the ``overdrive_kv`` attention function) vs a
float64 reference written here from the rule, on the tiny Llama (GQA 4:2), batch 2 with left padding, prefill
then decode; memory follows the spans; wrong plans are rejected."""
from __future__ import annotations

import math

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.moa import make_plan
from overdrive.testing import tiny_llama

SINK, MIN_SPAN = 3, 6
ALPHA = [[4.0, -8.0], [0.0, 10.0]]
BETA = [[0.25, 0.625], [0.5, 0.0]]


def _span(alpha: float, beta: float, n: int) -> int:
    """The rule, from the plan format's docstring, in Python floats."""
    return min(n, max(MIN_SPAN, math.ceil(alpha + beta * n)))


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """float64: query at real position t of KV head h reads real positions p <= t with p < SINK or
    p >= t + 1 - S + SINK (S = the head's span at N = t + 1); pads are neither read nor counted."""
    b, hq, n, d = query.shape
    hk = key.shape[1]
    layer = module.layer_idx
    pad = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = torch.zeros(b, n, hq, d, dtype=torch.float64)
    for r in range(b):
        real = pad[r].nonzero().flatten().tolist()  # cache index of each real token, in order
        for t, i in enumerate(real):
            for h in range(hq):
                kh = h // (hq // hk)
                s = _span(ALPHA[layer][kh], BETA[layer][kh], t + 1)
                keys = [real[p] for p in range(t + 1) if p < SINK or p >= t + 1 - s + SINK]
                w = torch.softmax(key[r, kh, keys].double() @ query[r, h, i].double() * scaling, 0)
                out[r, i, h] = w @ value[r, kh, keys].double()
    return out.to(query.dtype), None


def _pad_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    return attention_mask


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).eval()


def _plan(model):
    return make_plan(ModelIdentity.from_hf_config(model.config), ALPHA, BETA, sink=SINK, min_span=MIN_SPAN)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (2, 41), generator=g)
    mask = torch.ones(2, 41, dtype=torch.long)
    mask[1, :13] = 0  # row 1: 13 pads, 28 real tokens
    return ids, mask


def test_prefill_and_decode_logits_match_float64_reference(model):
    """Teacher-forced: a 29-token prompt (row 1: 16 real after left padding) in two pieces (fresh prefill, then a
    chunk through the pages), then 12 decode steps through the cache; every logit vs one float64 forward over the
    whole sequence with the reference masks."""
    import copy

    import overdrive.transformers as ot
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    ids, mask = _batch()
    prompt = 29
    cache = ot.kv_cache(model, "moa", plan=_plan(model))
    assert model.config._attn_implementation == "overdrive_kv"
    got = []
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        for a, b in ((0, 20), (20, prompt)):  # the prompt in two pieces: a fresh prefill, then a chunk over the pages
            out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True,
                        position_ids=pos[:, a:b])
            got.append(out.logits)
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True,
                        position_ids=mask[:, :t + 1].sum(1, keepdim=True) - 1)
            got.append(out.logits)
    got = torch.cat(got, 1)

    ref_model = copy.deepcopy(model).double()
    AttentionInterface.register("moa_test_reference", _reference_attention)
    AttentionMaskInterface.register("moa_test_reference", _pad_mask)
    ref_model.set_attn_implementation("moa_test_reference")
    with torch.no_grad():
        want = ref_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                         use_cache=False).logits
    real = mask.bool()
    err = (got.double() - want)[real].abs().max().item()
    assert err < 2e-3 * want[real].abs().max().item(), err
    # not vacuous: dense attention gives clearly different logits
    with torch.no_grad():
        dense = model.__class__.from_pretrained(tiny_llama(), dtype=torch.float64)(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    assert (dense - want)[real].abs().max() > 50 * err

    # memory: each head keeps its sink + window (closed form), held in 16-position pages
    layer = cache.layers[0]
    n = mask.sum(1)  # real tokens per row: 41, 28
    for r in range(2):
        for h in range(2):
            m = int(n[r])
            s = _span(ALPHA[0][h], BETA[0][h], m + 1)  # what the next query (length m + 1) reads
            kept = min(m, SINK) + max(0, m - (m + 1 - s + SINK))
            assert int(layer.positions_kept()[r, h]) == kept
    pages = int((layer.table >= 0).sum())
    assert layer.memory_bytes() == pages * 2 * 16 * 32 * 4
    assert pages < 2 * 2 * math.ceil(41 / 16)  # fewer pages than a dense cache of the longer row


def test_generate_batched_equals_one_row_at_a_time(model):
    """Left padding changes nothing: each row of a batched generate equals its own batch-1 generate."""
    import overdrive.transformers as ot
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama())
    prompts = ["the quick brown fox jumps over the lazy dog and runs far away", "hello world"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    both = model.generate(**enc, past_key_values=ot.kv_cache(model, "moa", plan=_plan(model)), **kw)
    for r, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        one = model.generate(ids, past_key_values=ot.kv_cache(model, "moa", plan=_plan(model)), **kw)
        assert both[r, -24:].tolist() == one[0, -24:].tolist()


def test_plan_for_another_model_is_rejected(model):
    import overdrive.transformers as ot

    other = make_plan(ModelIdentity("LlamaForCausalLM", 2, 4, 1, 32), [[0.0]] * 2, [[1.0]] * 2, sink=2, min_span=4)
    with pytest.raises(ConfigError, match="num_kv_heads: plan 1 vs model 2"):
        ot.kv_cache(model, "moa", plan=other)
    with pytest.raises(ConfigError, match=r"beta\[1\] must be in \[0, 1\]"):
        ot.kv_cache(model, "moa", plan={**_plan(model).to_dict(), "layers": [{"alpha": [0, 0], "beta": [0.5, 1.5]}] * 2})

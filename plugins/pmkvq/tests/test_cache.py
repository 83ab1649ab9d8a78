"""PM-KVQ through the generic transformers KV cache (overdrive.transformers.kv_cache): storage semantics
against an independent reconstruction, the progressive schedule, errors, and generation with a real
transformers model."""
from __future__ import annotations

import pytest
import torch

import overdrive.transformers as ot
from overdrive.adapters.transformers.kv_cache import OverdriveKVCache, OverdriveKVLayer
from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import KVBudgetError, LayerKVFormat, ModelIdentity
from overdrive.kernels import kv_dequantize, kv_quantize
from overdrive.kernels.kv_attention import cell_words
from overdrive.pmkvq.config import layer_peak_bytes, make_plan, token_bytes
from overdrive.pmkvq.method import METHOD


def _layer(bits: int, budget: int | None, group: int, sink: int, window: int, heads: int, layer: int = 0,
           d: int = 32) -> OverdriveKVLayer:
    """One cache layer of PM-KVQ at ``bits`` (16 with a budget: the progressive start)."""
    fmt = LayerKVFormat(layer=layer, num_kv_heads=heads, head_size=d, bits=bits, group=group, sink=sink, window=window,
                        cell_bytes=4 * cell_words(d, bits, group), budget_bytes=budget)
    return OverdriveKVLayer(METHOD, fmt, "pmkvq")


def _qdq(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    p, s, z = kv_quantize(x, bits, group)
    return kv_dequantize(p, s, z, bits, x.shape[-1], group, x.dtype)


@pytest.mark.parametrize("bits", [8, 2])
def test_returned_keys_follow_sink_window_body_rule(bits):
    """Step by step, the K/V a layer returns equal: sink and not-yet-flushed window exact, flushed
    chunks quantized at ``bits`` — rebuilt here from the quantizer and the flush rule's closed form."""
    g = torch.Generator().manual_seed(bits)
    sink, window, group = 1, 8, 32
    layer = _layer(bits, None, group, sink, window, heads=2)
    steps = [5, 1, 1, 9, 1, 1, 20, 1]
    ks = torch.randn(2, 2, sum(steps), 32, generator=g)
    vs = torch.randn(2, 2, sum(steps), 32, generator=g)
    seen = 0
    for n in steps:
        k_out, v_out = layer.update(ks[:, :, seen:seen + n], vs[:, :, seen:seen + n])
        # positions [sink, flushed) are in the body: flushed = sink + window * floor((seen - sink) / window)
        flushed = sink + window * (max(seen - sink, 0) // window) if seen > sink else min(seen, sink)
        want_k, want_v = ks[:, :, :seen + n].clone(), vs[:, :, :seen + n].clone()
        if flushed > sink:
            want_k[:, :, sink:flushed] = _qdq(ks[:, :, sink:flushed], bits, group)
            want_v[:, :, sink:flushed] = _qdq(vs[:, :, sink:flushed], bits, group)
        assert torch.equal(k_out, want_k) and torch.equal(v_out, want_v), (seen, n)
        seen += n
    assert layer.get_seq_length() == seen


def test_progressive_halving_and_memory_accounting():
    g = torch.Generator().manual_seed(0)
    h, d, group, sink, window = 2, 32, 32, 1, 8
    fp = 2 * h * d * 4  # float32 sink/window tokens
    budget = layer_peak_bytes(2, 64, h, d, group, sink, window, fp_bytes=4)
    layer = _layer(16, budget, group, sink, window, heads=h, layer=3)
    seen = 0
    while seen < 64:
        layer.update(torch.randn(1, h, 1, d, generator=g), torch.randn(1, h, 1, d, generator=g))
        seen += 1
        body = layer.body_length()
        n_win = seen - min(seen, sink) - body
        # memory is the closed-form byte count of what is stored at the current width
        assert layer.memory_bytes() == (min(seen, sink) + n_win) * fp + body * token_bytes(layer.fmt.bits, h, d, group)
        assert layer.memory_bytes() <= budget
    # the body went down one halving at a time, each when the layer was over budget
    assert [(a, b) for _, a, b in layer.shrink_events] == [(16, 8), (8, 4), (4, 2)]
    with pytest.raises(KVBudgetError, match="pmkvq layer 3: .* exceeds its budget .* at 2 bits"):
        for _ in range(64):
            layer.update(torch.randn(1, h, 1, d, generator=g), torch.randn(1, h, 1, d, generator=g))


def test_requantized_body_matches_integer_requant_of_16_bit_codes():
    """After 16 -> 8, the body dequantizes to the integer-domain requant of its 16-bit codes."""
    from overdrive.kernels import kv_requantize

    g = torch.Generator().manual_seed(1)
    group, sink, window = 32, 1, 8
    x = torch.randn(1, 1, 1 + 16, 32, generator=g)
    big = _layer(16, 10**9, group, sink, window, heads=1)
    big.update(x, x)
    assert big.fmt.bits == 16 and big.body_length() == 16
    tight = _layer(16, big.memory_bytes() - 1, group, sink, window, heads=1)
    tight.update(x, x)
    assert tight.fmt.bits == 8
    p, s, z = kv_quantize(x[:, :, 1:], 16, group)
    p8, s8 = kv_requantize(p, s, 16, 32)
    assert torch.equal(tight.decompressed_body()[0], kv_dequantize(p8, s8, z, 8, 32, group))


@pytest.fixture(scope="module")
def llama():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.testing import tiny_llama

    d = tiny_llama()
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), tok


def test_generate_at_16_bits_reproduces_the_unquantized_cache(llama):
    model, tok = llama
    ident = ModelIdentity.from_hf_config(model.config)
    enc = tok(["the quick brown fox", "hello"], return_tensors="pt", padding=True)  # batch 2, left padding
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    ref = model.generate(**enc, **kw)
    plan = make_plan(ident, [16, 16], 256, window=16, fp_bytes=4)  # window 16: several flushes in 40 tokens
    static = ot.kv_cache(model, "pmkvq", plan=plan, mode="static")
    assert torch.equal(model.generate(**enc, **kw, past_key_values=static), ref)
    assert static.layers[0].body_length() > 0  # the comparison did exercise the quantized body
    prog = ot.kv_cache(model, "pmkvq", plan=make_plan(ident, [2, 2], 512, window=16, fp_bytes=4))
    assert torch.equal(model.generate(**enc, **kw, past_key_values=prog), ref)
    assert prog.layer_bits == [16, 16]


def _teacher_forced_logits(model, ids, cache):
    out = []
    with torch.no_grad():
        out.append(model(ids[:, :8], past_key_values=cache, use_cache=True).logits[:, -1])
        for t in range(8, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def test_lower_bits_stay_within_measured_error(llama):
    """Logit error (max |diff| / std of the reference logits, teacher-forced 80 tokens, window 16).
    Measured on this fixture (2026-11-22): 16: 6e-5, 8: 0.017, 4: 0.19, 2: 1.19; bounds are ~2.5x."""
    from transformers import DynamicCache

    model, _ = llama
    ident = ModelIdentity.from_hf_config(model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    ref = _teacher_forced_logits(model, ids, DynamicCache(config=model.config))
    err = {}
    for bits in (16, 8, 4, 2):
        cache = ot.kv_cache(model, "pmkvq", plan=make_plan(ident, [bits, bits], 256, window=16, fp_bytes=4),
                            mode="static")
        err[bits] = float((_teacher_forced_logits(model, ids, cache) - ref).abs().max() / ref.std())
    assert err[16] < 2e-4 < err[8] < 0.05 and err[8] < err[4] < 0.5 and err[4] < err[2] < 3.0, err


def test_plan_for_another_model_is_rejected(llama):
    model, _ = llama
    other = ModelIdentity("LlamaForCausalLM", 3, 4, 1, 32)
    with pytest.raises(ConfigError, match="num_layers: plan 3 vs model 2; num_kv_heads: plan 1 vs model 2"):
        ot.kv_cache(model, "pmkvq", plan=make_plan(other, [4, 4, 4], 64))
    with pytest.raises(ConfigError, match=r"mode must be one of \('progressive', 'static'\), got 'fast'"):
        ot.kv_cache(model, "pmkvq", plan=make_plan(ModelIdentity.from_hf_config(model.config), [4, 4], 64), mode="fast")


def test_transformers_adapter_builds_the_cache_from_a_plan_file(llama, tmp_path):
    """overdrive.transformers.kv_cache(model, "pmkvq", plan): key scales folded into q_proj / k_proj (checked
    against the weights by hand, once even when called twice), static widths per layer, generation runs."""
    import copy

    from overdrive.pmkvq.calibrate import pair_max, scales_for

    model, tok = llama
    model = copy.deepcopy(model)
    ident = ModelIdentity.from_hf_config(model.config)
    g = torch.Generator().manual_seed(0)
    scales = [scales_for(pair_max(torch.rand(2, 32, generator=g) + 0.2), 0.5).tolist() for _ in range(2)]
    path = tmp_path / "plan.json"
    make_plan(ident, [4, 2], 256, window=16, fp_bytes=4, key_scales=scales).save(path)
    attn = model.model.layers[1].self_attn
    wq, wk = attn.q_proj.weight.detach().clone().double(), attn.k_proj.weight.detach().clone().double()
    cache = ot.kv_cache(model, "pmkvq", plan=str(path), mode="static")
    ot.kv_cache(model, "pmkvq", plan=str(path), mode="static")  # the same scales again: not folded twice
    assert isinstance(cache, OverdriveKVCache) and cache.layer_bits == [4, 2]
    s = torch.tensor(scales[1], dtype=torch.float64)  # (KV heads, D); q heads repeat each KV head's row
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    assert torch.allclose(attn.k_proj.weight.double(), wk / s.reshape(-1, 1), rtol=1e-6)
    assert torch.allclose(attn.q_proj.weight.double(), wq * s.repeat_interleave(rep, 0).reshape(-1, 1), rtol=1e-6)
    enc = tok(["the quick brown fox"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, min_new_tokens=20, do_sample=False, past_key_values=cache)
    assert out.shape[1] == enc.input_ids.shape[1] + 20

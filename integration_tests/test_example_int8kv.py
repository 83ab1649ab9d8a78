"""The example plugin's KV-cache method (``example_int8kv``: per-token symmetric int8 K/V, a full-precision
sink, no window, any head size and block size) reaches vLLM and transformers through the generic KV-cache
adapters with no adapter change: paged attention vs a float64 reference of the same quantization over a
simulated engine schedule, the transformers cache vs the closed form, and a real vLLM server whose tokens
equal transformers' with the same plan (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from overdrive.contracts.kv_cache import ModelIdentity, PagedBatch
from overdrive.testing import tiny_llama


def _qdq64(x: torch.Tensor) -> torch.Tensor:
    """The example's quantizer in float64, written from its docstring: per (token, head) scale max|x| / 127."""
    x = x.double()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


@pytest.fixture
def int8kv(example_registry):
    import overdrive

    return overdrive.get_method("example_int8kv").load_impl()


def test_paged_attention_matches_float64_reference_over_an_engine_schedule(int8kv):
    """Rows joining and decoding in mixed steps (block size 4, head size 48, GQA 2): each step's attention
    output vs float64 softmax attention over sink tokens exact, older tokens int8-quantize-dequantized, the
    step's own tokens exact; pages and the full-precision store written by the adapter's bookkeeping."""
    from overdrive.adapters.vllm.kv_cache import FullPrecisionStore, store_geometry, write_fp_store

    g = torch.Generator().manual_seed(0)
    hq, hk, d, bs, sink = 4, 2, 48, 4, 3
    ident = ModelIdentity("LlamaForCausalLM", 1, hq, hk, d)
    fmt = int8kv.layer_formats(int8kv.load_config({"sink": sink}), ident)[0]
    assert fmt.cell_bytes == 2 * d + 8 and fmt.window == 0 and fmt.uses_fp_store
    pages = torch.zeros(64, hk, bs, fmt.cell_bytes, dtype=torch.uint8)
    st = FullPrecisionStore(bs, *store_geometry((fmt,), "test"))
    pool = torch.zeros(16, hk, bs, fmt.fp_store_channels)
    blocks = {0: [5, 9, 2, 7, 11, 3], 1: [1, 8, 12, 4, 6, 10], 2: [13, 14, 15, 16, 17, 18]}
    hist = {r: (torch.zeros(0, hk, d, dtype=torch.float64), torch.zeros(0, hk, d, dtype=torch.float64)) for r in blocks}
    schedule = [{0: 6}, {0: 1, 1: 5}, {0: 1, 1: 1}, {0: 1, 1: 1, 2: 9}, {0: 3, 1: 1, 2: 1}, {0: 1, 1: 1, 2: 1}]
    scale, worst = d ** -0.5, 0.0
    for step in schedule:
        rows = list(step)
        qlens = [step[r] for r in rows]
        prev = [hist[r][0].shape[0] for r in rows]
        seq = [p + n for p, n in zip(prev, qlens)]
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        table = torch.tensor([blocks[r] for r in rows], dtype=torch.int32)
        slots = torch.tensor([blocks[r][p // bs] * bs + p % bs for r, a, b in zip(rows, prev, seq) for p in range(a, b)])
        fp = st.step(seq, qlens, qsl, table.tolist())
        batch = PagedBatch(query_start_loc=torch.tensor(qsl), prev_lens=torch.tensor(prev), block_table=table,
                           slot_mapping=slots, fp_block_table=st.block_table(table), fp_from=torch.tensor(fp["fp_from"]),
                           sink_ok=torch.tensor(fp["sink_ok"]), fp_write_index=torch.tensor(fp["w_index"], dtype=torch.long),
                           fp_write_slot=torch.tensor(fp["w_slot"], dtype=torch.long),
                           host_query_start_loc=qsl, host_prev_lens=prev)
        if st.capacity > pool.shape[0]:
            pool = torch.cat([pool, torch.zeros(st.capacity - pool.shape[0], *pool.shape[1:])])
        n = qsl[-1]
        q, k, v = torch.randn(n, hq, d, generator=g), torch.randn(n, hk, d, generator=g), torch.randn(n, hk, d, generator=g)
        out = int8kv.attend(fmt, pages, batch, q, k, v, scale, pool)
        int8kv.store(fmt, pages, batch, k, v)
        write_fp_store(pool, batch, k, v)
        for i, r in enumerate(rows):
            a, b = qsl[i], qsl[i + 1]
            kh, vh = hist[r]
            kc = torch.cat([kh[:sink], _qdq64(kh[sink:]), k[a:b].double()])
            vc = torch.cat([vh[:sink], _qdq64(vh[sink:]), v[a:b].double()])
            s = torch.einsum("mhd,thd->hmt", q[a:b].double(), kc.repeat_interleave(2, 1)) * scale
            causal = torch.arange(kc.shape[0])[None, :] <= (prev[i] + torch.arange(b - a))[:, None]
            ref = torch.einsum("hmt,thd->mhd", torch.softmax(s.masked_fill(~causal, float("-inf")), -1),
                               vc.repeat_interleave(2, 1))
            worst = max(worst, (out[a:b].double() - ref).abs().max().item())
            hist[r] = (torch.cat([kh, k[a:b].double()]), torch.cat([vh, v[a:b].double()]))
    assert worst < 1e-5, worst
    # the check is not vacuous: without the int8 rounding of old tokens the reference differs clearly
    k_all = hist[0][0]
    assert (_qdq64(k_all[sink:]) - k_all[sink:]).abs().max() > 1e-3


def test_transformers_cache_holds_sink_exact_and_int8_after(int8kv, example_registry):
    """The generic transformers cache with the example's formats: what each update returns, step by step."""
    from overdrive.adapters.transformers.kv_cache import OverdriveKVLayer

    g = torch.Generator().manual_seed(1)
    sink = 2
    fmt = int8kv.layer_formats(int8kv.load_config({"sink": sink}), ModelIdentity("M", 1, 2, 2, 40))[0]
    layer = OverdriveKVLayer(int8kv, fmt, "example_int8kv")
    ks, vs = torch.randn(2, 2, 14, 40, generator=g), torch.randn(2, 2, 14, 40, generator=g)
    seen = 0
    for n in [1, 4, 1, 1, 6, 1]:
        k_out, v_out = layer.update(ks[:, :, seen:seen + n], vs[:, :, seen:seen + n])
        for out, x in ((k_out, ks), (v_out, vs)):
            want = x[:, :, :seen + n].double().clone()
            if seen > sink:
                want[:, :, sink:seen] = _qdq64(x[:, :, sink:seen])
            assert (out.double() - want).abs().max() < 1e-6
        seen += n
        assert layer.body_length() == max(seen - sink, 0)  # no window: compressed right after its step
    # memory: sink at float32 + int8 codes and one float32 scale per token, head, K and V
    assert layer.memory_bytes() == 2 * 2 * (sink * 40 * 4 * 2 + (seen - sink) * (40 + 4) * 2)


def _plan(tmp_path, sink: int = 4):
    from overdrive_example.configs import Int8KVConfig

    from transformers import AutoConfig

    path = tmp_path / "int8kv.json"
    Int8KVConfig(sink=sink, model=ModelIdentity.from_hf_config(AutoConfig.from_pretrained(tiny_llama())).to_dict()
                 ).save(path)
    return path


def test_transformers_generate_and_plan_checks(example_registry, tmp_path):
    import overdrive.transformers as ot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.config import ConfigError

    d = tiny_llama()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    cache = ot.kv_cache(model, "example_int8kv", plan=str(_plan(tmp_path)))
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, past_key_values=cache)
    assert out.shape[1] == ids.shape[1] + 12 and cache.layers[0].body_length() == ids.shape[1] + 11 - 4
    with pytest.raises(ConfigError, match="unknown cache option"):
        ot.kv_cache(model, "example_int8kv", plan={"sink": 4}, mode="static")
    with pytest.raises(ConfigError, match="num_layers: plan 3 vs model 2"):
        ot.kv_cache(model, "example_int8kv", plan={"sink": 4, "model": {**ModelIdentity.from_hf_config(
            model.config).to_dict(), "num_layers": 3}})


PROMPTS = ["the quick brown fox", "hello world"]
MAX_TOKENS = 40
SERVE = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--block-size", "32"]


@pytest.mark.slow
def test_vllm_serves_example_int8kv_like_transformers(example_registry, plugin_env, tmp_path):
    """A real vLLM OpenAI server (CPU) with the example plugin installed and only --additional-config naming its
    plan: greedy tokens equal transformers with the same plan (one at a time and batched mid-generation), and
    the KV capacity vLLM reports follows the example's cell size (2 * head size + 8 bytes vs float32 K/V)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import overdrive.transformers as ot
    from overdrive.testing.vllm_server import VllmServer, kv_cache_tokens

    plan = _plan(tmp_path)
    args = SERVE + ["--additional-config", json.dumps({"example_int8kv": {"plan": str(plan)}})]
    with VllmServer(tiny_llama(), args, env=plugin_env, log_path=tmp_path / "vllm.log") as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
        batched = srv.staggered_greedy_token_ids(PROMPTS * 2, MAX_TOKENS)
        log = srv.log_text()
    tok = AutoTokenizer.from_pretrained(tiny_llama())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32)
    want = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        cache = ot.kv_cache(model, "example_int8kv", plan=str(plan))
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                             past_key_values=cache)
        want.append(gen[0, ids.shape[1]:].tolist())
    assert got == want
    assert batched == want * 2
    ident = ModelIdentity.from_hf_config(model.config)
    per_token = ident.num_layers * ident.num_kv_heads * (2 * ident.head_size + 8)
    tokens = kv_cache_tokens(log)
    assert tokens == 2**30 // per_token // 32 * 32  # VllmServer's 1 GiB VLLM_CPU_KVCACHE_SPACE, block 32


@pytest.mark.slow  # ~33 s on this CPU (SGLang's imports in a subprocess)
def test_sglang_backend_of_the_example_follows_its_semantics(plugin_env, tmp_path):
    """SGLang (registries and pools on CPU; its server needs CUDA): the example's backend is registered by name and,
    over SGLang's real pools, attends like the generic cache + float64 (tokens past the sink int8-rounded in place)."""
    from overdrive.testing.probe import child_env, run_probe

    plan = tmp_path / "int8kv.json"
    plan.write_text(json.dumps({"version": 1, "sink": 3}))
    out = run_probe(Path(__file__).parent / "probes" / "sglang_kv.py", "example_int8kv", str(plan),
                    env=child_env(plugin_env, engine=True)).result
    assert out["registered"] and out["choices"] == 1 and out["cli"] == "example_int8kv"
    assert out["lens"] == [22, 16] and out["body"] == 22 - 3  # every token past the sink was compressed
    assert out["max_err"] < 1e-5, out

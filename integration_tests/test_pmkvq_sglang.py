"""PM-KVQ in SGLang 0.5.23 on CPU: the backend is in SGLang's real attention registry and CLI choices, and its
forward (SGLang's torch-native attention over SGLang's real KV pools) follows the transformers cache's
semantics step by step. SGLang's server needs CUDA, so no server is started."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(r"""
    import argparse, json, types, torch
    from sglang.srt.plugins import load_plugins
    load_plugins(); load_plugins()
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.server_args import ServerArgs
    from overdrive.adapters.sglang_kv_cache import make_backend_class
    from overdrive.config import ConfigError
    from overdrive.contracts.kv_cache import ModelIdentity
    from overdrive.adapters.transformers_kv_cache import OverdriveKVLayer
    from overdrive.pmkvq.config import make_plan
    from overdrive.pmkvq.method import METHOD

    out = {"registered": "pmkvq" in ATTENTION_BACKENDS, "choices": ATTENTION_BACKEND_CHOICES.count("pmkvq")}
    p = argparse.ArgumentParser(); ServerArgs.add_cli_args(p)
    out["cli"] = p.parse_args(["--model-path", "m", "--attention-backend", "pmkvq"]).attention_backend
    try:  # the factory without a plan: a clear error before touching the runner
        ATTENTION_BACKENDS["pmkvq"](None)
    except ConfigError as e:
        out["no_plan"] = str(e)
    out["subclass"] = issubclass(make_backend_class(), AttentionBackend)
    import os, tempfile
    from transformers import AutoConfig
    from overdrive.adapters.sglang_kv_cache import load_formats
    from overdrive.testing import tiny_llama
    wrong = os.path.join(tempfile.mkdtemp(), "wrong.json")
    make_plan(ModelIdentity("LlamaForCausalLM", 3, 4, 2, 32), [4, 4, 4], 64).save(wrong)
    os.environ["OVERDRIVE_PMKVQ_PLAN"] = wrong
    try:
        load_formats("pmkvq", AutoConfig.from_pretrained(tiny_llama()))
    except ConfigError as e:
        out["wrong_plan"] = str(e)

    hq, hk, d, window = 4, 2, 32, 8
    ident = ModelIdentity("LlamaForCausalLM", 1, hq, hk, d)
    g = torch.Generator().manual_seed(0)
    half = torch.rand(hk, d // 2, generator=g) + 0.5
    scale = torch.cat([half, half], -1)  # rotary pairs share a scale
    plan = make_plan(ident, [2], 256, window=window, fp_bytes=4, key_scales=[scale.tolist()])
    fmts = METHOD.layer_formats(plan, ident)
    rtp = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    kvp = MHATokenToKVPool(size=256, page_size=1, dtype=torch.float32, head_num=hk, head_dim=d, layer_num=1,
                           device="cpu", enable_memory_saver=False)
    runner = types.SimpleNamespace(device="cpu", req_to_token_pool=rtp, token_to_kv_pool=kvp)  # holds SGLang's pools
    be = make_backend_class()(runner, METHOD, fmts)
    layer = RadixAttention(hq, d, d ** -0.5, hk, 0)
    # independent reference: the generic transformers cache layer (static 2 bits, sink 1, window 8) + float64 attention,
    # with the key scale applied by hand (q * s, k / s)
    refs = [OverdriveKVLayer(METHOD, fmts[0], "pmkvq") for _ in range(2)]
    slots = [list(range(0, 64)), list(range(100, 164))]
    for r in range(2):
        rtp.req_to_token[r, :64] = torch.tensor(slots[r], dtype=torch.int32)
    cur, err, lens0 = [0, 0], 0.0, [13, 5]
    for step in range(14):
        new = lens0 if step == 0 else [1, 1]
        tot = [c + n for c, n in zip(cur, new)]
        n = sum(new)
        q = torch.randn(n, hq * d, generator=g)
        k, v = torch.randn(n, hk, d, generator=g), torch.randn(n, hk, d, generator=g)
        loc = torch.tensor([slots[r][p] for r in range(2) for p in range(cur[r], tot[r])], dtype=torch.int64)
        fb = ForwardBatch(forward_mode=ForwardMode.EXTEND if step == 0 else ForwardMode.DECODE, batch_size=2,
                          input_ids=torch.zeros(n, dtype=torch.long), req_pool_indices=torch.tensor([0, 1]),
                          seq_lens=torch.tensor(tot), out_cache_loc=loc, seq_lens_sum=sum(tot),
                          extend_prefix_lens=torch.tensor(cur), extend_seq_lens=torch.tensor(new))
        be.init_forward_metadata(fb)
        o = (be.forward_extend if step == 0 else be.forward_decode)(q.clone(), k.clone(), v, layer, fb)
        a = 0
        for r in range(2):
            m = new[r]
            qr = (q[a:a + m].view(m, hq, d) * scale.repeat_interleave(2, 0)).transpose(0, 1)
            kr = (k[a:a + m] / scale).transpose(0, 1)[None]
            K, V = refs[r].update(kr, v[a:a + m].transpose(0, 1)[None])
            K, V = K[0].double().repeat_interleave(2, 0), V[0].double().repeat_interleave(2, 0)
            s = qr.double() @ K.transpose(1, 2) * d ** -0.5
            mask = torch.arange(tot[r])[None, :] <= (tot[r] - m + torch.arange(m))[:, None]
            ref = (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ V).transpose(0, 1).reshape(m, -1)
            err = max(err, (o[a:a + m].double() - ref).abs().max().item())
            a += m
        cur = tot
    out["max_err"], out["lens"] = err, cur
    out["body_quantized"] = refs[0].body_length() > 0
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # imports SGLang in a fresh process
def test_sglang_registry_and_backend_semantics():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OVERDRIVE_PMKVQ_PLAN")}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, r.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["registered"] and out["choices"] == 1 and out["cli"] == "pmkvq" and out["subclass"]
    assert "needs a plan: set OVERDRIVE_PMKVQ_PLAN=PLAN.json" in out["no_plan"]
    assert "was made for another model" in out["wrong_plan"] and "num_layers: plan 3 vs model 2" in out["wrong_plan"]
    assert out["lens"] == [26, 18] and out["body_quantized"]
    assert out["max_err"] < 1e-5, out

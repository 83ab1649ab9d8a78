"""Probe (``python sglang_kv_spans.py NAME PLAN``): a KV-cache method whose formats have per-head spans, through
overdrive's generic SGLang backend over SGLang's real pools (``ReqToTokenPool``, ``MHATokenToKVPool``) for two
requests (prefills of 23 and 9 tokens, then decodes), compared with float64 attention written here from the span
rule of the formats (``HeadSpans``: alpha, beta, min_span; sink). Emits registration facts and the largest error.

Run in a subprocess: SGLang's plugin loader changes process-wide state. The plan must be for
``ModelIdentity("LlamaForCausalLM", 1, 4, 2, 32)``.
"""
from __future__ import annotations

import argparse
import math
import types

import torch

from overdrive.testing.probe import emit


def main(name: str, plan: str) -> dict:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    import overdrive
    from overdrive.adapters.sglang.kv_cache import make_backend_class
    from overdrive.contracts.kv_cache import ModelIdentity

    load_plugins()
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    out = {"registered": name in ATTENTION_BACKENDS, "choices": ATTENTION_BACKEND_CHOICES.count(name),
           "cli": p.parse_args(["--model-path", "m", "--attention-backend", name]).attention_backend}
    method = overdrive.get_method(name).load_impl()
    hq, hk, d = 4, 2, 32
    fmt = method.layer_formats(method.load_config(plan), ModelIdentity("LlamaForCausalLM", 1, hq, hk, d))[0]
    spans = fmt.head_spans
    rtp = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    kvp = MHATokenToKVPool(size=256, page_size=1, dtype=torch.float32, head_num=hk, head_dim=d, layer_num=1,
                           device="cpu", enable_memory_saver=False)
    runner = types.SimpleNamespace(device="cpu", req_to_token_pool=rtp, token_to_kv_pool=kvp)
    be = make_backend_class()(runner, method, [fmt])
    layer = RadixAttention(hq, d, d ** -0.5, hk, 0)
    slots = [list(range(200, 72, -1)), list(range(5, 133))]  # scattered, descending for row 0
    for r in range(2):
        rtp.req_to_token[r, :128] = torch.tensor(slots[r][:128], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    hist = [(torch.zeros(0, hk, d, dtype=torch.float64), torch.zeros(0, hk, d, dtype=torch.float64)) for _ in range(2)]
    cur, err, dense_gap = [0, 0], 0.0, 0.0
    for step in range(16):
        new = [23, 9] if step == 0 else [1, 1]
        tot = [c + n for c, n in zip(cur, new)]
        n = sum(new)
        q = torch.randn(n, hq * d, generator=g)
        k, v = torch.randn(n, hk, d, generator=g) * 2, torch.randn(n, hk, d, generator=g)
        loc = torch.tensor([slots[r][t] for r in range(2) for t in range(cur[r], tot[r])], dtype=torch.int64)
        fb = ForwardBatch(forward_mode=ForwardMode.EXTEND if step == 0 else ForwardMode.DECODE, batch_size=2,
                          input_ids=torch.zeros(n, dtype=torch.long), req_pool_indices=torch.tensor([0, 1]),
                          seq_lens=torch.tensor(tot), out_cache_loc=loc, seq_lens_sum=sum(tot),
                          extend_prefix_lens=torch.tensor(cur), extend_seq_lens=torch.tensor(new))
        be.init_forward_metadata(fb)
        o = (be.forward_extend if step == 0 else be.forward_decode)(q.clone(), k.clone(), v, layer, fb)
        a = 0
        for r in range(2):
            kh = torch.cat([hist[r][0], k[a:a + new[r]].double()])
            vh = torch.cat([hist[r][1], v[a:a + new[r]].double()])
            for j in range(new[r]):
                t = cur[r] + j
                for h in range(hq):
                    g_ = h // (hq // hk)
                    s = min(t + 1, max(spans.min_span, math.ceil(spans.alpha[g_] + spans.beta[g_] * (t + 1))))
                    keys = [x for x in range(t + 1) if x < fmt.sink or x >= t + 1 - s + fmt.sink]
                    qv = q[a + j].view(hq, d)[h].double()
                    ref = torch.softmax(kh[keys, g_] @ qv * d ** -0.5, 0) @ vh[keys, g_]
                    dense = torch.softmax(kh[:t + 1, g_] @ qv * d ** -0.5, 0) @ vh[:t + 1, g_]
                    got = o[a + j].view(hq, d)[h].double()
                    err = max(err, (got - ref).abs().max().item())
                    dense_gap = max(dense_gap, (dense - ref).abs().max().item())
            hist[r] = (kh, vh)
            a += new[r]
        cur = tot
    out.update(max_err=err, dense_gap=dense_gap, lens=cur)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("plan")
    args = ap.parse_args()
    emit(main(args.name, args.plan))

"""A KV-cache method's SGLang backend, as overdrive's generic adapter registers it, over SGLang's real pools.

    python sglang_kv.py NAME PLAN.json [--lens 11,5] [--steps 12] [--wrong-plan PLAN2.json --model DIR]

Two requests (prefills of ``--lens`` tokens, then decodes) are compared with an independent reference: the
generic transformers cache layer of the same format (what attention should read) and float64 softmax
attention. Also reports the registry/CLI state, the factory's error without a plan, and (``--wrong-plan``)
the error for a plan made for another model than ``--model``. Emits one result (overdrive.testing.probe).

A fresh process because SGLang's plugin loader and pools change process-wide state; needs the method's
plugin importable (PYTHONPATH) and a plan for a 1-layer model with 4 query heads, 2 KV heads of size 32.
"""
from __future__ import annotations

import argparse
import types

import torch


def main(name: str, plan: str, lens: list[int], steps: int, wrong_plan: str | None, model: str | None) -> dict:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    import overdrive
    from overdrive.adapters.sglang.kv_cache import load_formats, make_backend_class
    from overdrive.config import ConfigError
    from overdrive.adapters.transformers.kv_cache import OverdriveKVLayer
    from overdrive.contracts.kv_cache import ModelIdentity

    load_plugins()
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    out = {"registered": name in ATTENTION_BACKENDS, "choices": ATTENTION_BACKEND_CHOICES.count(name),
           "cli": p.parse_args(["--model-path", "m", "--attention-backend", name]).attention_backend}
    try:  # the factory without a plan: a clear error before touching the runner
        ATTENTION_BACKENDS[name](None)
    except ConfigError as e:
        out["no_plan"] = str(e)
    if wrong_plan:
        import os

        from transformers import AutoConfig

        os.environ[f"OVERDRIVE_{name.upper()}_PLAN"] = wrong_plan
        try:
            load_formats(name, AutoConfig.from_pretrained(model))
        except ConfigError as e:
            out["wrong_plan"] = str(e)
        del os.environ[f"OVERDRIVE_{name.upper()}_PLAN"]
    method = overdrive.get_method(name).load_impl()
    hq, hk, d = 4, 2, 32
    fmts = method.layer_formats(method.load_config(plan), ModelIdentity("LlamaForCausalLM", 1, hq, hk, d))
    rtp = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    kvp = MHATokenToKVPool(size=256, page_size=1, dtype=torch.float32, head_num=hk, head_dim=d, layer_num=1,
                           device="cpu", enable_memory_saver=False)
    runner = types.SimpleNamespace(device="cpu", req_to_token_pool=rtp, token_to_kv_pool=kvp)  # holds SGLang's pools
    be = make_backend_class()(runner, method, fmts)
    layer = RadixAttention(hq, d, d ** -0.5, hk, 0)
    refs = [OverdriveKVLayer(method, fmts[0], name) for _ in range(2)]
    slots = [list(range(0, 64)), list(range(100, 164))]
    for r in range(2):
        rtp.req_to_token[r, :64] = torch.tensor(slots[r], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    cur, err = [0, 0], 0.0
    for step in range(steps):
        new = lens if step == 0 else [1, 1]
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
            qr, kr = method.transform_qk(fmts[0], q[a:a + m].view(m, hq, d), k[a:a + m])
            kk, vv = refs[r].update(kr.transpose(0, 1)[None], v[a:a + m].transpose(0, 1)[None])
            kk, vv = kk[0].double().repeat_interleave(hq // hk, 0), vv[0].double().repeat_interleave(hq // hk, 0)
            s = qr.transpose(0, 1).double() @ kk.transpose(1, 2) * d ** -0.5
            mask = torch.arange(tot[r])[None, :] <= (tot[r] - m + torch.arange(m))[:, None]
            ref = (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv).transpose(0, 1).reshape(m, -1)
            err = max(err, (o[a:a + m].double() - ref).abs().max().item())
            a += m
        cur = tot
    out.update(max_err=err, lens=cur, body=refs[0].body_length())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("plan")
    ap.add_argument("--lens", default="11,5")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--wrong-plan")
    ap.add_argument("--model")
    args = ap.parse_args()
    from overdrive.testing.probe import emit

    emit(main(args.name, args.plan, [int(x) for x in args.lens.split(",")], args.steps, args.wrong_plan, args.model))

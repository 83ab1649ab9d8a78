"""MoA vs dense attention and vs uniform spans at equal density on a real small LLM (a benchmark, not a test).

    python -m overdrive.benchmarks.moa [--model DIR] [--plan PLAN.json] [--json OUT] [--quick]

Default model: SmolLM2-135M-Instruct (overdrive.testing.real; 30 layers, 9 query / 3 KV heads). Text:
Newton's *Opticks* as shipped in ``apache-tvm-ffi``: the plan is calibrated on the First Book by the real
CLI (``overdrive calibrate --method moa``, a subprocess: wall time recorded), everything else is measured on
the Second and Third Books. Baselines get the same sink (64) and smallest span, and read as many positions
per query as the MoA plan does on average over its heads (the density at that length: mean S_h(N) / N),
matched separately at each measured length N:

* ``streamingllm``: one fixed window for every head (beta = 0), StreamingLLM's sink + recent window;
* ``uniform-elastic``: one elastic span for every head (alpha = 0, beta matched), the paper's uniform baseline.

Measured (the span rule is per query, so a query at position t uses S(t + 1); the metrics look at the last
``--tail`` positions of each context, whose spans are those of the context's length, as in MoA's evaluation
where a request of length N uses S(N) throughout):

1. **perplexity** of the last ``--tail`` tokens of ``--eval-chunks`` chunks of ``--eval-len`` tokens (one forward
   through the span cache per chunk: it equals token-by-token decoding);
2. **attention-output error**: per layer, ||O_sparse - O_dense|| / ||O_dense|| over the last ``--tail`` queries,
   with the dense model's q/k/v, at ``--long-len`` (beyond the calibration lengths) on (a) evaluation text and
   (b) synthetic passkey contexts (filler sentences with a 5-digit key at a random depth and the question last);
3. **decode**: after a ``--long-len`` prompt, the median time of a decode step through transformers (dense:
   ``DynamicCache`` + SDPA; sparse: overdrive's span cache), the K/V bytes each decode step reads (per
   layer and KV head: the sink + window positions vs every position), the KV memory held, and the fraction of
   vLLM's pages (16 positions x all KV heads of a layer) that no head of their layer reads again (allocated
   until the request ends: what per-head spans cannot free in vLLM).

On CPU the span kernels run their torch implementations (``overdrive.kernels.span_attention``); the Triton
kernels' numbers come from ``python -m overdrive.benchmarks.kernels --op span_attention`` on a GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header, write_json
from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.metrics import token_nll

from overdrive.moa.config import MoAPlan, matched_baselines, mean_span, uniform_plan

RECORD = "overdrive_moa_bench_record"
PARTS = ("perplexity", "error", "decode")
_RECORDED: dict[int, tuple] = {}


def _record_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _RECORDED[module.layer_idx] = (query.detach(), key.detach(), value.detach(), scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def calibrate_cli(model: Path, text: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "moa", "--model", str(model), "--output",
           str(out), "--density", str(args.density), "--max-len", str(args.calib_max_len), "--samples",
           str(args.calib_samples), "--sink", str(args.sink), "--min-span", str(args.min_span), "--data", str(text),
           "--target", args.calib_target, "--response-tokens", str(args.calib_response_tokens)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OVERDRIVE_PROGRESS": "0"})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-3000:]}")
    return {"seconds": time.perf_counter() - t, "command": " ".join(cmd[1:]), "stdout": r.stdout.strip()}


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, plan: MoAPlan | None, tail: int) -> float:
    """exp(mean NLL) of the last ``tail`` tokens of each row (queries at lengths near the row's length)."""
    import overdrive.transformers as ot

    nll, count = 0.0, 0
    for row in ids:
        row = row[None]
        if plan is None:
            model.set_attn_implementation("sdpa")
            logits = model(input_ids=row, use_cache=False).logits
        else:
            logits = model(input_ids=row, past_key_values=ot.kv_cache(model, "moa", plan=plan), use_cache=True).logits
        nll += token_nll(logits[:, -tail - 1:-1], row[:, -tail:])
        count += tail
    return math.exp(nll / count)


@torch.no_grad()
def attention_error(model: torch.nn.Module, ids: torch.Tensor, plans: dict[str, MoAPlan], tail: int) -> dict[str, Any]:
    """Mean over layers (and contexts) of the relative attention-output error vs dense of the last ``tail``
    queries of each context, per plan."""
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from overdrive.kernels.span_attention import span_prefill_attention

    AttentionInterface.register(RECORD, _record_attention)
    AttentionMaskInterface.register(RECORD, sdpa_mask)
    out: dict[str, list[float]] = {name: [] for name in plans}
    per_layer: dict[str, list[float]] = {name: [0.0] * model.config.num_hidden_layers for name in plans}
    for row in ids:
        _RECORDED.clear()
        model.set_attn_implementation(RECORD)
        model(input_ids=row[None], use_cache=False)
        n = row.numel()
        for i, (q, k, v, scale) in sorted(_RECORDED.items()):
            hq, hk, d = q.shape[1], k.shape[1], q.shape[-1]
            dense = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1),
                                                   is_causal=True, scale=scale)[0].transpose(0, 1)  # (N, Hq, D)
            qt, kt, vt = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
            for name, plan in plans.items():
                starts = plan.head_spans(i).starts(torch.arange(1, n + 1), plan.sink)
                got = span_prefill_attention(qt, kt, vt, [0, n], starts, plan.sink, scale)
                e = float((got[-tail:] - dense[-tail:]).norm() / dense[-tail:].norm())
                out[name].append(e)
                per_layer[name][i] += e / ids.shape[0]
    model.set_attn_implementation("sdpa")
    return {name: {"mean": statistics.mean(v), "max_layer": max(per_layer[name]), "per_layer": per_layer[name]}
            for name, v in out.items()}


def passkey_contexts(tokenizer, n_tokens: int, count: int, seed: int = 0) -> torch.Tensor:
    """Synthetic long contexts: filler sentences, a 5-digit pass key at a random depth, the question last."""
    g = torch.Generator().manual_seed(seed)
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
    rows = []
    for _ in range(count):
        key = int(torch.randint(10000, 99999, (1,), generator=g))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        question = " What is the pass key? The pass key is"
        body = tokenizer(filler * (n_tokens // 10), add_special_tokens=False).input_ids
        nid, qid = tokenizer(needle, add_special_tokens=False).input_ids, tokenizer(question, add_special_tokens=False).input_ids
        room = n_tokens - len(nid) - len(qid)
        at = int(torch.randint(0, room, (1,), generator=g))
        rows.append(body[:at] + nid + body[at:room] + qid)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def decode_cost(model: torch.nn.Module, prompt: torch.Tensor, plan: MoAPlan | None, steps: int) -> dict[str, Any]:
    """Median decode-step time after ``prompt`` (1, L), K/V bytes read per step and KV bytes held."""
    import overdrive.transformers as ot
    from transformers import DynamicCache

    ident = ModelIdentity.from_hf_config(model.config)
    L = prompt.shape[1]
    el = 4
    if plan is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        cache = ot.kv_cache(model, "moa", plan=plan)
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
        tok = out.logits[:, -1:].argmax(-1)
    dense_read = (L + 1) * ident.num_layers * ident.num_kv_heads * 2 * ident.head_size * el
    if plan is None:
        read, held = dense_read, L * ident.num_layers * ident.num_kv_heads * 2 * ident.head_size * el
    else:
        n = torch.tensor([L + 1])
        read = 0
        for i in range(ident.num_layers):
            st = plan.head_spans(i).starts(n, plan.sink)[0]
            read += int((min(plan.sink, L + 1) + (L + 1 - st).clamp_min(0)).sum()) * 2 * ident.head_size * el
        held = sum(layer.memory_bytes() for layer in cache.layers)
    return {"step_seconds": statistics.median(times), "kv_read_bytes_per_token": read,
            "kv_read_fraction": read / dense_read, "kv_bytes_held": held}


def unread_pages(plan: MoAPlan, length: int, block_size: int = 16) -> float:
    """Fraction of a ``length``-token request's vLLM pages (``block_size`` positions, all KV heads of a layer) that
    no head of their layer reads again (no sink position, wholly before every head's next window start), averaged
    over layers: what a span-aware block manager could release; vLLM keeps them until the request ends."""
    n = torch.tensor([length + 1])
    blocks = -(-length // block_size)
    dead = 0
    for i in range(len(plan.layers)):
        lo = int(plan.head_spans(i).starts(n, plan.sink).min())
        dead += sum(1 for b in range(blocks) if b * block_size >= plan.sink and (b + 1) * block_size <= lo)
    return dead / (blocks * len(plan.layers))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from overdrive.testing.real import opticks_split

    calib_text, eval_text = opticks_split()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = _load(args.model)
    ident = ModelIdentity.from_hf_config(model.config)
    calib = None
    if args.plan is None:
        text = workdir / "calibration.txt"
        text.write_text(calib_text)
        args.plan = workdir / "plan.json"
        calib = calibrate_cli(args.model, text, args.plan, args)
        print(calib["stdout"], flush=True)
    plan = MoAPlan.load(args.plan)
    plans_eval = {"moa": plan, **matched_baselines(plan, ident, args.eval_len)}
    plans_long = {"moa": plan, **matched_baselines(plan, ident, args.long_len)}
    stream = tok(eval_text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    ids = stream[:args.eval_chunks * args.eval_len].reshape(args.eval_chunks, args.eval_len)
    rows: dict[str, dict[str, Any]] = {}
    for name, p in [("dense", None), *plans_eval.items()]:
        pl = plans_long.get(name)
        rows[name] = {"reads_at_eval_len": args.eval_len if p is None else mean_span(p, args.eval_len),
                      "reads_at_long_len": args.long_len if pl is None else mean_span(pl, args.long_len),
                      "density_at_eval_len": 1.0 if p is None else p.density_at(args.eval_len)}
        if p is not None:
            rows[name]["spans_eval"] = {"alpha": [x["alpha"] for x in p.layers], "beta": [x["beta"] for x in p.layers]}
            rows[name]["spans_long"] = {"alpha": [x["alpha"] for x in pl.layers], "beta": [x["beta"] for x in pl.layers]}
        if "perplexity" in args.parts:
            t = time.perf_counter()
            rows[name]["perplexity"] = perplexity(model, ids, p, args.tail)
            rows[name]["eval_seconds"] = time.perf_counter() - t
            print(f"{name}: perplexity {rows[name]['perplexity']:.3f} (reads {rows[name]['reads_at_eval_len']:.0f} of "
                  f"{args.eval_len})", flush=True)
    long_text = stream[-args.long_chunks * args.long_len:].reshape(args.long_chunks, args.long_len)
    if "error" in args.parts:
        err_text = attention_error(model, long_text, plans_long, args.tail)
        err_key = attention_error(model, passkey_contexts(tok, args.long_len, args.long_chunks), plans_long, args.tail)
        for name in plans_long:
            rows[name]["attention_error_text"] = err_text[name]
            rows[name]["attention_error_passkey"] = err_key[name]
            print(f"{name}: attention error text {err_text[name]['mean']:.4f}, passkey {err_key[name]['mean']:.4f}",
                  flush=True)
    if "decode" in args.parts:
        for name, p in [("dense", None), *plans_long.items()]:
            rows[name]["decode"] = decode_cost(model, long_text[:1], p, args.decode_steps)
            rows[name]["decode"]["vllm_unread_allocated_fraction"] = 0.0 if p is None else unread_pages(p, args.long_len)
            d = rows[name]["decode"]
            print(f"{name}: decode step {d['step_seconds'] * 1e3:.1f} ms, KV read/token "
                  f"{d['kv_read_bytes_per_token'] / 2**20:.2f} MiB ({d['kv_read_fraction']:.3f} of dense), held "
                  f"{d['kv_bytes_held'] / 2**20:.2f} MiB", flush=True)
    return {
        **header("moa", "cpu"),
        "model": str(args.model), "identity": ident.to_dict(),
        "calibration": calib, "plan": str(args.plan), "plan_calibration": plan.calibration,
        "text": {"calibration": "Newton, Opticks (1730), the First Book (apache-tvm-ffi "
                                "tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt)",
                 "evaluation": "the same file, the Second and Third Books"},
        "eval": {"chunks": args.eval_chunks, "len": args.eval_len, "tail": args.tail},
        "long": {"chunks": args.long_chunks, "len": args.long_len, "tail": args.tail},
        "decode_steps": args.decode_steps, "threads": torch.get_num_threads(), "parts": list(args.parts), "sink": plan.sink, "min_span": plan.min_span, "rows": rows,
    }


def format_table(r: dict[str, Any]) -> str:
    e, lg = r["eval"], r["long"]
    lines = [f"| attention | positions read at {e['len']} / {lg['len']} | perplexity, last {e['tail']} of {e['chunks']} x "
             f"{e['len']} | attention-output error at {lg['len']}, text / passkey | decode step at {lg['len']} | "
             "KV read per token | KV held | vLLM pages unread but allocated |", "|---|---|---|---|---|---|---|---|"]
    for name, x in r["rows"].items():
        d = x.get("decode")
        err = (f"{x['attention_error_text']['mean']:.4f} / {x['attention_error_passkey']['mean']:.4f}"
               if "attention_error_text" in x else ("0 / 0" if name == "dense" else "-"))
        dec = (f"{d['step_seconds'] * 1e3:.1f} ms | {d['kv_read_bytes_per_token'] / 2**20:.2f} MiB "
               f"({d['kv_read_fraction']:.2f}) | {d['kv_bytes_held'] / 2**20:.2f} MiB | "
               f"{d['vllm_unread_allocated_fraction']:.2f}") if d else "- | - | - | -"
        ppl = f"{x['perplexity']:.3f}" if "perplexity" in x else "-"
        lines.append(f"| {name} | {x['reads_at_eval_len']:.0f} / {x['reads_at_long_len']:.0f} | {ppl} | {err} | {dec} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.moa", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a Llama-style checkpoint (default: SmolLM2-135M)")
    ap.add_argument("--plan", type=Path, default=None, help="a MoA plan for the model (default: calibrate one)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--calib-max-len", type=int, default=2048, help="calibration --max-len (lengths max/4, max/2)")
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--calib-target", choices=("dense", "text"), default="dense", help="calibration --target")
    ap.add_argument("--calib-response-tokens", type=int, default=0, help="calibration --response-tokens (0: its default)")
    ap.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS), help="what to measure")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--min-span", type=int, default=128)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--eval-len", type=int, default=2048)
    ap.add_argument("--tail", type=int, default=256, help="perplexity and attention error over each context's last TAIL "
                    "positions (queries near the context's length, where its spans are those of that length)")
    ap.add_argument("--long-chunks", type=int, default=2)
    ap.add_argument("--long-len", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the measurements (1: small decode ops do not wait on a busy second core)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.model is None:
        from overdrive.testing.real import smollm2_135m

        args.model = smollm2_135m()
    if args.quick:
        args.calib_max_len, args.calib_samples, args.sink, args.min_span = 256, 1, 4, 16
        args.eval_chunks, args.eval_len, args.long_chunks, args.long_len, args.decode_steps = 1, 192, 1, 320, 3
        args.tail = 64
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moa-bench-") as tmp:
        r = run(args, Path(tmp))
    print(f"{r['device']}  {r['date']}  model {r['model']}")
    print(format_table(r))
    if args.json:
        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""EEP vs REAP vs frequency vs random expert pruning on a real-weight MoE testbed.

    python -m overdrive.benchmarks.eep [--keep 4 2] [--json OUT] [--quick]

Testbed: SmolLM2-135M-Instruct MoEfied into 8 experts per layer, 6 active
(:func:`overdrive.testing.moefy.moefied_smollm2`). Search/calibration text: paragraphs of the First Book
of *Opticks*; evaluation: disjoint chunks of the Second and Third Books. For each number of kept experts
B and each strategy: held-out perplexity, top-1 next-token accuracy (the task score), search time,
function evaluations, parameters of the pruned model (what the exported checkpoint holds), and whether
the plan exports exactly as a standard checkpoint. ``--quick``: the tiny random Mixtral, seconds.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header, write_json
from overdrive.metrics import token_nll


def _records(tok: Any, text: str, n: int, length: int) -> list:
    from overdrive.contracts.expert_pruning import TaskRecord

    ids = tok(text)["input_ids"]
    out = []
    for i in range(n):
        chunk = ids[i * length:(i + 1) * length]
        if len(chunk) < length:
            break
        out.append(TaskRecord(chunk[:1], chunk[1:]))
    return out


@torch.inference_mode()
def evaluate(model: torch.nn.Module, chunks: torch.Tensor) -> dict[str, float]:
    nll, hits, count = 0.0, 0, 0
    for b in chunks:
        logits = model(b[None]).logits[0, :-1].float()
        tgt = b[1:]
        nll += token_nll(logits, tgt)
        hits += int((logits.argmax(-1) == tgt).sum())
        count += tgt.numel()
    return {"perplexity": math.exp(nll / count), "top1": hits / count}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.adapters.transformers.expert_pruning import TransformersExpertSession, apply_maps, restore
    from overdrive.eep.calibrate import calibrate
    from overdrive.eep.config import EEPConfig

    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.eep", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, nargs="+", default=[4, 2], help="experts kept per layer (of 8)")
    ap.add_argument("--strategies", nargs="+", default=["eep", "reap", "frequency", "random"])
    ap.add_argument("--train-records", type=int, default=12)
    ap.add_argument("--dev-records", type=int, default=4)
    ap.add_argument("--record-len", type=int, default=128)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--prune-generations", type=int, default=6)
    ap.add_argument("--merge-generations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny random Mixtral, small search (seconds)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        from overdrive.testing.moe import tiny_moe

        model_dir = tiny_moe("mixtral")
        train_text = eval_text = " ".join(f"the fox {i} jumps over the dog {i % 7}" for i in range(400))
        args.train_records, args.dev_records, args.record_len = 4, 2, 16
        args.eval_chunks, args.eval_len, args.population = 2, 32, 4
        args.prune_generations, args.merge_generations = 2, 1
        dense_dir = None
    else:
        from overdrive.testing.moefy import moefied_smollm2
        from overdrive.testing.real import opticks_split, smollm2_135m

        model_dir = moefied_smollm2()
        dense_dir = smollm2_135m()
        train_text, eval_text = opticks_split()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    recs = _records(tok, train_text, args.train_records + args.dev_records, args.record_len)
    dev, train = recs[: args.dev_records], recs[args.dev_records:]
    ev_ids = tok(eval_text)["input_ids"][: args.eval_chunks * args.eval_len]
    chunks = torch.tensor(ev_ids[: (len(ev_ids) // args.eval_len) * args.eval_len]).view(-1, args.eval_len)
    session = TransformersExpertSession(model)
    ident = session.identity
    report = header("eep", model=str(model_dir), quick=args.quick, experts=ident.num_experts, top_k=ident.top_k,
                    options={k: v for k, v in vars(args).items() if k != "json"})
    rows: list[dict[str, Any]] = []
    moe_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel()
                        for b in (model.model.layers[i].mlp for i in ident.moe_layers))
    base = evaluate(model, chunks)
    rows.append({"strategy": "unpruned MoE", "kept": ident.num_experts, "active": ident.top_k, **base,
                 "params": moe_params})
    if dense_dir is not None:
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        rows.append({"strategy": "dense SmolLM2-135M", "kept": None, "active": None, **evaluate(dense, chunks),
                     "params": sum(p.numel() for p in dense.parameters())})
        del dense
    print(f"unpruned: {base}", file=sys.stderr)
    for keep in args.keep:
        for strategy in args.strategies:
            cfg = EEPConfig(experts=keep, strategy=strategy, population=args.population,
                            prune_generations=args.prune_generations, merge_generations=args.merge_generations,
                            elite=min(3, args.population - 1), freeze_route=True, seed=0)
            t0 = time.perf_counter()
            plan = calibrate(session, train, dev, cfg)
            secs = time.perf_counter() - t0
            apply_maps(model, plan.layers)
            try:
                m = evaluate(model, chunks)
            finally:
                restore(model)
            params = moe_params - expert_params + expert_params * keep // ident.num_experts
            row = {"strategy": strategy, "kept": keep, "active": plan.top_k, **m, "search_s": round(secs, 1),
                   "evaluations": int(plan.fitness.get("evaluations", 1)), "train_loglik": plan.fitness["train"],
                   "params": params, "exports_exactly": plan.discrete}
            rows.append(row)
            print(row, file=sys.stderr)
    report["rows"] = rows
    if args.json:
        write_json(args.json, report)
    print(_table(rows))
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| strategy | kept / active | perplexity | top-1 | search s | params (M) |", "|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["kept"] is None else f"{r['kept']} / {r['active']}"
        lines.append(f"| {r['strategy']} | {kept} | {r['perplexity']:.2f} | {100 * r['top1']:.1f}% | "
                     f"{r.get('search_s', '-')} | {r['params'] / 1e6:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

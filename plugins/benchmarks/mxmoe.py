"""MxMoE vs uniform RTN / GPTQ at equal average bits on the MoEfied SmolLM2 testbed.

    OMP_NUM_THREADS=1 python -m overdrive.benchmarks.mxmoe [--bits 2.25 3.25 4.25] [--json OUT] [--quick]

Testbed: SmolLM2-135M-Instruct MoEfied into 8 experts per layer, 6 active
(:func:`overdrive.testing.moefy.moefied_smollm2`). Calibration: chunks of the First Book of *Opticks*;
evaluation: held-out perplexity and top-1 on chunks of the Second and Third Books. One sensitivity pass
(GPTQ for every candidate format, Hessians weighted by the squared routing weight) serves every budget:
per budget the per-layer program chooses the mixed formats (r = 1: accuracy only), and the uniform
baselines put every expert linear in the largest weight-only format that fits the budget (RTN: round to
nearest; GPTQ: the same pass's GPTQ codes). Expert weights only (attention, routers, LM head in float32);
weight-only formats (the quantized weights are put into the float model's experts, exactly what the
runtime computes). ``--max-layers N``: only the first N MoE layers' experts are quantized (all rows alike),
for a machine too busy for the whole pass. ``--quick``: the tiny random Mixtral, seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from overdrive.benchmarks import header, write_json
from overdrive.benchmarks.eep import evaluate  # held-out perplexity and top-1

CANDIDATES = ("w2g64", "w2g192", "w3g64", "w3g192", "w4g64", "w4g192", "w8g192")
QUICK_CANDIDATES = ("w2g32", "w2g64", "w3g32", "w3g64", "w4g32", "w4g64", "w8g64")


def _put(model: torch.nn.Module, weights: dict[tuple[int, int, str], torch.Tensor]) -> None:
    """Write (layer, expert, linear) weights into the float model's fused experts."""
    with torch.no_grad():
        for (l, e, lin), w in weights.items():
            ex = model.model.layers[l].mlp.experts
            i = ex.down_proj.shape[2]
            if lin == "gate":
                ex.gate_up_proj[e, :i] = w
            elif lin == "up":
                ex.gate_up_proj[e, i:] = w
            else:
                ex.down_proj[e] = w


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.adapters.transformers.moe_quant import moe_view
    from overdrive.contracts.llm_calibration import load_for_calibration
    from overdrive.mbq.data import text_samples
    from overdrive.mxmoe.allocate import allocate
    from overdrive.mxmoe.calibrate import calibrate_layer
    from overdrive.mxmoe.config import LINEARS, linear_shape, parse_format
    from overdrive.mxmoe.costs import CostTable
    from overdrive.mxmoe.quant import dequantize, quantize_weight

    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.mxmoe", description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, nargs="+", default=[2.25, 3.25, 4.25])
    ap.add_argument("--samples", type=int, default=16, help="calibration chunks")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--max-layers", type=int, default=0,
                    help="quantize the experts of the first N MoE layers only (the rest stay float in every row); "
                         "0: all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cands = QUICK_CANDIDATES if args.quick else CANDIDATES
    if args.quick:
        from overdrive.testing.moe import tiny_moe

        model_dir = tiny_moe("mixtral")
        train_text = eval_text = " ".join(f"the fox {i} jumps over the dog {i % 7}" for i in range(600))
        args.samples, args.seq_len, args.eval_chunks, args.eval_len = 4, 64, 2, 64
    else:
        from overdrive.testing.moefy import moefied_smollm2
        from overdrive.testing.real import opticks_split

        model_dir = moefied_smollm2()
        train_text, eval_text = opticks_split()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ev = tok(eval_text)["input_ids"][: args.eval_chunks * args.eval_len]
    chunks = torch.tensor(ev[: (len(ev) // args.eval_len) * args.eval_len]).view(-1, args.eval_len)

    # one calibration pass: every candidate's GPTQ codes and sensitivities, per MoE layer
    t0 = time.perf_counter()
    run = load_for_calibration(model_dir, device="cpu", dtype="float32")
    costs = CostTable("cpu", torch.float32)
    results = []
    try:
        batches = [s.inputs for s in text_samples(tok, [train_text], args.samples, args.seq_len)]
        for block in run.blocks(batches, propagate="original", desc="mxmoe sensitivity"):
            view = moe_view(block.module, run.config)
            if view is None:
                continue
            x = block.record(["mlp"])["mlp"].input_rows()
            res = calibrate_layer(view, x, block.index, cands, "gptq", max(args.bits), 1.0, costs, 256,
                                  rs=(1.0,), keep_all=True)
            res.float_weights = {(e, lin): view.weight(e, lin).detach().float().cpu().clone()
                                 for e in range(view.num_experts) for lin in LINEARS}
            results.append(res)
            print(f"layer {block.index}: calibrated", file=sys.stderr)
            if args.max_layers and len(results) >= args.max_layers:
                break
    finally:
        run.close()
    costs.save()
    calib_s = time.perf_counter() - t0

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager").eval()
    hidden = model.config.hidden_size
    inter = results[0].float_weights[(0, "down")].shape[1]
    float_w = {(r.layer, e, lin): w for r in results for (e, lin), w in r.float_weights.items()}
    report = header("mxmoe", model=str(model_dir), quick=args.quick, candidates=list(cands),
                    calibration_s=round(calib_s, 1), cost_device=costs.device_name,
                    quantized_layers=[r.layer for r in results],
                    note="shared 2-core machine (other jobs running); expert weights only; r = 1",
                    options={k: v for k, v in vars(args).items() if k != "json"})
    rows: list[dict[str, Any]] = [{"config": "float32", "bits": 32.0, **evaluate(model, chunks)}]
    print(rows[-1], file=sys.stderr)

    def deq(t: dict[str, torch.Tensor], name: str, lin: str) -> torch.Tensor:
        return dequantize(t, parse_format(name), linear_shape(lin, hidden, inter)[1], torch.float32)

    for budget in args.bits:
        # uniform: the largest weight-only candidate that fits every linear within the budget
        fits = [c for c in cands if parse_format(c).weight_only and all(
            linear_shape(l, hidden, inter)[1] % parse_format(c).group_size == 0 for l in LINEARS)]
        uni = max((c for c in fits if max(parse_format(c).bits_per_weight(linear_shape(l, hidden, inter)[1])
                                           for l in LINEARS) <= budget),
                  key=lambda c: parse_format(c).bits_per_weight(hidden), default=None)
        if uni is None:
            print(f"{budget}: no uniform candidate fits", file=sys.stderr)
            continue
        ci = cands.index(uni)
        # uniform RTN
        _put(model, {k: deq(quantize_weight(w, parse_format(uni), "rtn")[0], uni, k[2]) for k, w in float_w.items()})
        rows.append({"config": f"uniform RTN {uni}", "bits": budget, "avg_bits": parse_format(uni).bits_per_weight(hidden),
                     **evaluate(model, chunks)})
        print(rows[-1], file=sys.stderr)
        # uniform GPTQ (this pass's codes)
        _put(model, {(r.layer, e, lin): deq(r.all_tensors[(e, lin, ci)], uni, lin)
                     for r in results for e in range(len(r.frequency)) for lin in LINEARS})
        rows.append({"config": f"uniform GPTQ {uni}", "bits": budget,
                     "avg_bits": parse_format(uni).bits_per_weight(hidden), **evaluate(model, chunks)})
        print(rows[-1], file=sys.stderr)
        # MxMoE
        weights, used, hist = {}, [], {}
        for r in results:
            a = allocate(r.loss, r.time, r.bits, r.numel, budget, 1.0)
            used.append(a.avg_bits)
            for b, c in enumerate(a.choice):
                e, lin = b // 3, LINEARS[b % 3]
                weights[(r.layer, e, lin)] = deq(r.all_tensors[(e, lin, c)], cands[c], lin)
                hist[cands[c]] = hist.get(cands[c], 0) + 1
        _put(model, weights)
        rows.append({"config": "MxMoE (GPTQ)", "bits": budget, "avg_bits": float(np.mean(used)),
                     "formats": dict(sorted(hist.items())), **evaluate(model, chunks)})
        print(rows[-1], file=sys.stderr)
    _put(model, float_w)
    report["rows"] = rows
    if args.json:
        write_json(args.json, report)
    print(_table(rows))
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| budget (bits) | config | avg bits | perplexity | top-1 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['config']} | {r.get('avg_bits', r['bits']):.3f} | {r['perplexity']:.2f} | "
                     f"{100 * r['top1']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Does MoA's influence estimate predict the real loss of cutting heads? (a measurement, not a test)

    python -m overdrive.benchmarks.moa_influence [--length 1024] [--samples 1] [--tail 256] [--json OUT] [--quick]

On SmolLM2-135M (default; ``overdrive.testing.real``) and held-out-free calibration text (Newton's *Opticks*,
the First Book, as the MoA benchmark calibrates on), for ``--samples`` sequences of ``--length`` tokens with the
loss on their last ``--tail`` tokens (``--target text``):

1. **Predicted** loss change of giving one KV head a span (others dense), from one forward + backward, by both
   estimates of :func:`overdrive.moa.calibrate.candidate_losses`: ``entry`` (MoA's per-entry influence summed
   over the dropped entries) and ``row`` (each query row's drop renormalised exactly, the loss linearised in the
   attention output only). Cuts: the smallest span (``min_span``: sink + recent window) and half the length.
2. **Exact** loss change of masking that head alone (a real forward with a per-head boolean mask through SDPA,
   independent of the span kernels) for a sample of heads: the ``--cheap`` heads the entry estimate calls
   cheapest (what the milp cuts first) and ``--others`` spread evenly over the rest (its cheapest and its costliest included).
3. **Additivity**: the exact loss change of cutting the k cheapest heads at once (k in ``--sets``) vs the sum of
   their predicted and their single exact changes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header, write_json
from overdrive.contracts.kv_cache import HeadSpans, ModelIdentity

CUTS = {"min_span": (0.0, 0.0), "half": (0.0, 0.5)}  # (alpha, beta): the sink + the smallest span; half the length


def span_mask(spans: HeadSpans, n: int, sink: int) -> torch.Tensor:
    """(Hk, N, N) bool: query i (length i + 1) reads key j of KV head h (the HeadSpans rule)."""
    starts = spans.starts(torch.arange(1, n + 1), sink)  # (N, Hk)
    j = torch.arange(n)
    causal = j[None, :] <= j[:, None]
    keep = (j[None, None, :] < sink) | (j[None, None, :] >= starts.t()[:, :, None])
    return causal[None] & keep


@torch.no_grad()
def masked_loss(run, ids: torch.Tensor, tail: int, cuts: dict[tuple[int, int], tuple[float, float]], min_span: int,
                sink: int, ident: ModelIdentity) -> float:
    """Mean loss of the last ``tail`` tokens with KV head (layer, h) given span (alpha, beta) for each cut: SDPA with
    a per-head boolean mask in the cut layers, the model's own attention elsewhere."""
    from overdrive.moa.calibrate import _response_loss

    n = ids.shape[1]
    masks = {}
    for layer in sorted({l for l, _ in cuts}):
        ab = [cuts.get((layer, h), (0.0, 1.0)) for h in range(ident.num_kv_heads)]
        masks[layer] = span_mask(HeadSpans(tuple(a for a, _ in ab), tuple(b for _, b in ab), min_span), n, sink)

    def attention(call):
        mask = masks.get(call.layer)
        if mask is None:
            return None
        rep = call.query.shape[1] // call.key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            call.query, call.key.repeat_interleave(rep, 1), call.value.repeat_interleave(rep, 1),
            attn_mask=mask.to(call.query.device).repeat_interleave(rep, 0)[None], scale=call.scale)
        return out.transpose(1, 2).contiguous()

    (logits,) = run.forward([{"input_ids": ids}], attention=attention, logits=slice(-tail - 1, -1))
    return float(_response_loss(logits, ids, tail))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from overdrive.contracts.llm_calibration import load_for_calibration
    from overdrive.moa.calibrate import CalibOptions, profile
    from overdrive.testing.real import opticks_split

    llm = load_for_calibration(args.model, device="cpu", dtype="float32")
    tok = llm.tokenizer
    ident = llm.geometry.identity
    text = opticks_split()[0]
    stream = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    ids = stream[:args.samples * args.length].reshape(args.samples, args.length)
    cuts = {k: v for k, v in CUTS.items() if k in args.cuts}
    spans = HeadSpans(tuple(a for a, _ in cuts.values()), tuple(b for _, b in cuts.values()), args.min_span)
    t0 = time.perf_counter()
    pred = {}
    for est in ("entry", "row"):
        opts = CalibOptions(response_tokens=args.tail, sink=args.sink, min_span=args.min_span, estimate=est,
                            target="text")
        pred[est] = profile(llm, [ids], opts, spans, ident)  # (L, Hk, 2)
    profile_s = time.perf_counter() - t0
    dense = masked_loss(llm, ids, args.tail, {}, args.min_span, args.sink, ident)
    units = [(l, h) for l in range(ident.num_layers) for h in range(ident.num_kv_heads)]
    order = sorted(units, key=lambda u: float(pred["entry"][u[0], u[1], 0]))  # cheapest min-span cut first
    rest = order[args.cheap:]
    picks = sorted({round(i * (len(rest) - 1) / max(1, args.others - 1)) for i in range(args.others)}) if rest else []
    sample = order[:args.cheap] + [rest[i] for i in picks]  # evenly over the rest, the costliest head included
    heads = []
    for (l, h) in sample:
        row = {"layer": l, "kv_head": h}
        for c, (name, ab) in enumerate(cuts.items()):
            row[name] = {"entry": float(pred["entry"][l, h, c]), "row": float(pred["row"][l, h, c]),
                         "exact": masked_loss(llm, ids, args.tail, {(l, h): ab}, args.min_span, args.sink, ident) - dense}
        heads.append(row)
        print(f"layer {l:2d} head {h}: " + "; ".join(
            f"{name} entry {row[name]['entry']:+.4f} row {row[name]['row']:+.4f} exact {row[name]['exact']:+.4f}"
            for name in cuts), flush=True)
    single = {(r["layer"], r["kv_head"]): r["min_span"]["exact"] for r in heads}
    sets = []
    for k in args.sets:
        chosen = order[:k]
        exact = masked_loss(llm, ids, args.tail, {u: CUTS["min_span"] for u in chosen}, args.min_span, args.sink,
                            ident) - dense
        known = [single[u] for u in chosen if u in single]
        sets.append({"k": k, "heads": [list(u) for u in chosen], "exact": exact,
                     "sum_entry": float(sum(pred["entry"][l, h, 0] for l, h in chosen)),
                     "sum_row": float(sum(pred["row"][l, h, 0] for l, h in chosen)),
                     "sum_single_exact": sum(known) if len(known) == len(chosen) else None})
        print(f"cut the {k} cheapest heads to min_span: exact {exact:+.4f}, sum entry {sets[-1]['sum_entry']:+.4f}, "
              f"sum row {sets[-1]['sum_row']:+.4f}, sum of single exact {sets[-1]['sum_single_exact']}", flush=True)

    def corr(est: str, cut: str) -> float:
        xs = [r[cut][est] for r in heads]
        ys = [r[cut]["exact"] for r in heads]
        return statistics.correlation(xs, ys) if len(heads) > 2 else float("nan")

    summary = {cut: {est: {"pearson": corr(est, cut),
                           "median_exact_over_predicted": statistics.median(
                               r[cut]["exact"] / r[cut][est] for r in heads if abs(r[cut][est]) > 1e-9)}
                     for est in ("entry", "row")} for cut in cuts}
    return {**header("moa_influence", "cpu"), "model": str(args.model), "identity": ident.to_dict(),
            "text": "Newton, Opticks, the First Book (overdrive.testing.real.opticks_split)",
            "length": args.length, "samples": args.samples, "tail": args.tail, "sink": args.sink,
            "min_span": args.min_span, "cuts": {k: list(v) for k, v in cuts.items()}, "dense_loss": dense,
            "profile_seconds": profile_s, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "heads": heads, "sets": sets, "summary": summary,
            "all_predicted": {est: pred[est].tolist() for est in pred}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.moa_influence", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a Llama-style checkpoint (default: SmolLM2-135M)")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--tail", type=int, default=256, help="loss on the last TAIL tokens of each sequence")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--min-span", type=int, default=128)
    ap.add_argument("--cheap", type=int, default=8, help="heads the entry estimate calls cheapest, measured exactly")
    ap.add_argument("--others", type=int, default=6, help="further heads, spread over the rest, measured exactly")
    ap.add_argument("--sets", type=int, nargs="*", default=[3, 8, 23], help="cut the k cheapest heads at once")
    ap.add_argument("--cuts", nargs="+", choices=tuple(CUTS), default=list(CUTS), help="spans measured per head")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (a smoke run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if "min_span" not in args.cuts:
        ap.error("--cuts must include min_span (the sets and the head order use it)")
    args.cuts = [c for c in CUTS if c in args.cuts]  # min_span first
    if args.quick:
        from overdrive.testing import tiny_llama

        args.model = args.model or tiny_llama()
        args.length, args.tail, args.sink, args.min_span, args.cheap, args.others, args.sets = 96, 32, 4, 8, 2, 2, [2, 3]
    if args.model is None:
        from overdrive.testing.real import smollm2_135m

        args.model = smollm2_135m()
    torch.set_num_threads(args.threads)
    r = run(args)  # the calibration run is closed with the process
    print(f"{r['device']}  {r['date']}  dense loss {r['dense_loss']:.4f}  ({r['seconds']:.0f} s)")
    for cut, s in r["summary"].items():
        print(f"{cut}: " + "; ".join(f"{est}: pearson {v['pearson']:.3f}, median exact/predicted "
                                     f"{v['median_exact_over_predicted']:.2f}" for est, v in s.items()))
    if args.json:
        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MoA vs StreamingLLM vs uniform elastic spans vs dense on long-context retrieval and held-out perplexity
(MoA's evaluation, built locally; a benchmark, not a test).

    python -m overdrive.benchmarks.moa_longctx [--densities 0.3 0.5 0.7] [--lengths 1024 2048 4096]
        [--samples 2] [--plan-dir DIR] [--json OUT] [--quick]

Model: SmolLM2-135M-Instruct (``overdrive.testing.real``; 8192 positions) unless ``--model``. Per density, the
MoA plan is ``DIR/moa-d<density>.json`` when it exists (``--plan-dir``), else the real CLI calibrates it there
(``overdrive calibrate --method moa``, a subprocess; calibration text: Newton's *Opticks*, the First Book;
``--calib-*`` options; one influence profile shared by every density through ``--profile-cache``).
Everything is measured at each length ``N`` of ``--lengths`` against the same-reads references
(``overdrive.moa.config.matched_baselines``: the mean over heads of the positions a query at ``N`` reads is
the MoA plan's), all with the plan's sink:

* **passkey**: filler sentences ("The grass is green. ..."), one 5-digit pass key at a depth swept over
  ``--samples`` evenly spaced positions of the context, the question last; correct when the greedy answer is
  the key (teacher-forced: every answer token is the argmax after the right prefix, which is what greedy
  decoding of the answer means);
* **multikey**: the same filler with four keyed values ("The pass key of the red door is 48213.") at spread
  depths, the asked one at the swept depth, the others distractors;
* **perplexity** of the last ``--tail`` tokens of ``--ppl-chunks`` held-out chunks of ``N`` tokens (the Second and
  Third Books of *Opticks*, unseen by the calibration).

Sparse rows run the transformers span cache (``overdrive.transformers.kv_cache``: what a user runs; on CPU the
torch span kernels). The span rule is per query (its own length), so the answer tokens at the end of an
``N``-token prompt use the spans of length ~``N``. The report is written after every measurement (a cut-short run
keeps what it measured, and ``missing`` names what it did not reach; ``goals`` are read only off finished
measurements, per length).
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
from overdrive.moa.config import MoAPlan, matched_baselines, mean_span

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DOORS = ("red", "blue", "green", "white")
METHODS = ("dense", "moa", "streamingllm", "uniform-elastic")
TASKS = ("passkey", "multikey")


def depths(samples: int) -> list[float]:
    """Needle depths (fraction of the context before the needle) swept evenly over the context."""
    return [(i + 0.5) / samples for i in range(samples)]


def retrieval_prompt(tokenizer, task: str, length: int, depth: float, seed: int) -> tuple[list[int], list[int]]:
    """(prompt + answer token ids of exactly ``length`` tokens, answer ids): filler with the needle(s) at
    ``depth``, the question last, the answer appended (scored teacher-forced)."""
    g = torch.Generator().manual_seed(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    keys = [int(x) for x in torch.randint(10000, 99999, (len(DOORS),), generator=g)]
    if task == "passkey":
        needles = [(depth, f" The pass key is {keys[0]}. Remember it. {keys[0]} is the pass key. ")]
        question, answer = " What is the pass key? The pass key is", f" {keys[0]}"
    elif task == "multikey":
        ask = int(torch.randint(0, len(DOORS), (1,), generator=g))
        others = [d for i, d in enumerate(DOORS) if i != ask]
        spots = [(depth + (i + 1) / len(DOORS)) % 1.0 for i in range(len(others))]  # spread around the asked one
        needles = [(depth, f" The pass key of the {DOORS[ask]} door is {keys[ask]}. ")]
        needles += [(s, f" The pass key of the {d} door is {keys[DOORS.index(d)]}. ") for s, d in zip(spots, others)]
        question, answer = f" What is the pass key of the {DOORS[ask]} door? The pass key of the {DOORS[ask]} door is", \
            f" {keys[ask]}"
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    ans, q = enc(answer), enc(question)
    parts = sorted((d, enc(t)) for d, t in needles)
    room = length - len(q) - len(ans) - sum(len(p) for _, p in parts)
    if room < 1:
        raise ValueError(f"{task}: {length} tokens cannot hold the needles and the question")
    body = enc(FILLER * (room // 8 + 8))[:room]
    ids, at = [], 0
    for d, p in parts:
        cut = int(d * room)
        ids += body[at:cut] + p
        at = cut
    ids += body[at:] + q + ans
    return ids, ans


@torch.no_grad()
def logits_tail(model, ids: torch.Tensor, plan: MoAPlan | None, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions of ``ids`` (1, N): dense SDPA or the MoA span cache."""
    import overdrive.transformers as ot

    if plan is None:
        model.set_attn_implementation("sdpa")
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    cache = ot.kv_cache(model, "moa", plan=plan)
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep).logits


def retrieved(model, ids: list[int], answer: list[int], plan: MoAPlan | None) -> bool:
    lg = logits_tail(model, torch.tensor([ids]), plan, len(answer) + 1)
    return lg[0, :-1].argmax(-1).tolist() == answer


def chunk_nll(model, ids: torch.Tensor, plan: MoAPlan | None, tail: int) -> float:
    """Summed NLL of the last ``tail`` tokens of ``ids`` (1, N)."""
    return token_nll(logits_tail(model, ids, plan, tail + 1)[:, :-1], ids[:, -tail:])


def calibrate_cli(model: Path, density: float, out: Path, text: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "moa", "--model", str(model),
           "--output", str(out), "--density", str(density), "--max-len", str(args.calib_max_len),
           "--samples", str(args.calib_samples), "--sink", str(args.sink), "--min-span", str(args.min_span),
           "--data", str(text), "--target", args.calib_target, "--profile-cache", str(out.parent / "profile")]
    if args.calib_lengths:
        cmd += ["--lengths", args.calib_lengths]
    if args.calib_validate_length:
        cmd += ["--validate-length", str(args.calib_validate_length)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OVERDRIVE_PROGRESS": "0"})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-3000:]}")
    print(r.stdout.strip(), r.stderr.strip(), sep="\n", flush=True)
    return {"seconds": time.perf_counter() - t, "command": " ".join(cmd[1:]), "stdout": r.stdout.strip(),
            "stderr": r.stderr.strip()}


def _done(report: dict[str, Any], n: int, what: str) -> bool:
    """True when every measurement of ``what`` ("retrieval" or "perplexity") at length ``n`` is in the report."""
    prefixes = (f"N={n} perplexity ",) if what == "perplexity" else tuple(f"N={n} {t} " for t in TASKS)
    return not any(m.startswith(prefixes) for m in report["missing"])


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals read off the finished measurements: per goal, ``by_length`` (every length where it is
    complete) and the entry at the longest such length; absent where nothing of it is complete."""
    rows = report["rows"]
    lengths = sorted(int(n) for n in report["lengths"])

    def ret_d5(n: int) -> dict[str, Any] | None:
        cell = rows.get("0.5", {}).get(str(n))
        if not (cell and "retrieval" in cell and _done(report, n, "retrieval")):
            return None
        acc = {m: cell["retrieval"][m]["all"] for m in ("dense", "moa", "streamingllm", "uniform-elastic")}
        ratio = acc["moa"] / acc["streamingllm"] if acc["streamingllm"] else (math.inf if acc["moa"] else None)
        return {**acc, "ratio": ratio, "goal": ">= 1.5", "met": ratio is not None and ratio >= 1.5}

    def ppl_d5(n: int) -> dict[str, Any] | None:
        cell = rows.get("0.5", {}).get(str(n))
        if not (cell and "perplexity" in cell and _done(report, n, "perplexity")):
            return None
        p = cell["perplexity"]
        return {m: p[m] for m in ("dense", "moa", "uniform-elastic", "streamingllm")} | {
            "goal": "moa <= uniform-elastic", "met": p["moa"] <= p["uniform-elastic"],
            "moa_over_uniform_elastic": p["moa"] / p["uniform-elastic"]}

    def gap_d3(n: int) -> dict[str, Any] | None:
        cell = rows.get("0.3", {}).get(str(n))
        if not (cell and "perplexity" in cell and _done(report, n, "perplexity")):
            return None
        p = cell["perplexity"]
        gap = {"moa": p["moa"] - p["dense"], "streamingllm": p["streamingllm"] - p["dense"]}
        return {**gap, "goal": "moa <= streamingllm / 2", "met": gap["moa"] <= gap["streamingllm"] / 2}

    out: dict[str, Any] = {}
    for name, fn in (("d0.5_retrieval_moa_over_streamingllm", ret_d5),
                     ("d0.5_perplexity_moa_vs_uniform_elastic", ppl_d5), ("d0.3_gap_to_dense", gap_d3)):
        by = {str(n): g for n in lengths if (g := fn(n)) is not None}
        if by:
            top = max(by, key=int)
            out[name] = {**by[top], "length": int(top), "by_length": by}
    return out


def save(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Goals from what is finished, then the report (atomically) when ``--json``: called after every
    measurement, so a cut-short run keeps its rows and ``missing`` names the ones it did not reach."""
    report["complete"] = not report["missing"]
    report["goals"] = goals(report)
    if args.json:
        write_json(args.json, {**report, "load_average_now": os.getloadavg()})


def run(args: argparse.Namespace, plan_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.testing.real import opticks_split

    calib_text, eval_text = opticks_split()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ident = ModelIdentity.from_hf_config(model.config)
    plans: dict[str, MoAPlan] = {}
    for d in args.densities:
        path = plan_dir / f"moa-d{d}.json"
        if not path.is_file():
            text = plan_dir / "calibration.txt"
            text.write_text(calib_text)
            report["calibration"][str(d)] = calibrate_cli(args.model, d, path, text, args)
        report["missing"].remove(f"calibration d{d}")
        plans[str(d)] = MoAPlan.load(path)
        report["plans"][str(d)] = {"path": str(path), "calibration": plans[str(d)].calibration,
                                   "alpha": [x["alpha"] for x in plans[str(d)].layers],
                                   "beta": [x["beta"] for x in plans[str(d)].layers]}
        save(args, report)
    need = args.ppl_chunks * max(args.lengths)
    stream = tok(eval_text[:16 * need + 4096], return_tensors="pt", add_special_tokens=False).input_ids[0]
    if stream.numel() < need:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens; --ppl-chunks x the longest length needs {need}")
    rows = report["rows"]
    for n in args.lengths:
        t0 = time.perf_counter()
        configs: dict[str, dict[str, MoAPlan | None]] = {
            d: {"moa": p, **matched_baselines(p, ident, n)} for d, p in plans.items()}
        for d, cfg in configs.items():
            rows.setdefault(d, {})[str(n)] = {"reads": {m: mean_span(p, n) for m, p in cfg.items()},
                                              "density": {m: p.density_at(n) for m, p in cfg.items()}}
        dense: dict[str, Any] = {"retrieval": {}, "perplexity": None}
        prompts = [(task, i, *retrieval_prompt(tok, task, n, dep, seed=1000 * n + 17 * i + TASKS.index(task)))
                   for task in args.tasks for i, dep in enumerate(depths(args.samples))]
        hits: dict[str, dict[str, list[bool]]] = {}

        def acc(key: str) -> dict[str, float]:
            per = {t: sum(v) / len(v) for t, v in hits[key].items()}
            return {**per, "all": sum(sum(v) for v in hits[key].values()) / sum(len(v) for v in hits[key].values())}

        for task, i, ids, ans in prompts:
            hits.setdefault("dense", {}).setdefault(task, []).append(retrieved(model, ids, ans, None))
            for d, cfg in configs.items():
                for m, p in cfg.items():
                    hits.setdefault(f"{d}/{m}", {}).setdefault(task, []).append(retrieved(model, ids, ans, p))
            print(f"N={n} {task} depth {depths(args.samples)[i]:.2f}: " + " ".join(
                f"{k}={int(v[task][-1])}" for k, v in hits.items()), flush=True)
            for d in configs:
                cell = rows[d][str(n)]
                cell["retrieval"] = {"dense": acc("dense"), **{m: acc(f"{d}/{m}") for m in configs[d]}}
                cell["hits"] = {"dense": hits["dense"], **{m: hits[f"{d}/{m}"] for m in configs[d]}}
            report["missing"].remove(f"N={n} {task} depth {depths(args.samples)[i]:.2f}")
            save(args, report)
        chunks = stream[:args.ppl_chunks * n].reshape(args.ppl_chunks, n) if args.ppl_chunks else stream[:0].view(0, n)
        nll: dict[str, float] = {}
        for c, row in enumerate(chunks):
            nll["dense"] = nll.get("dense", 0.0) + chunk_nll(model, row[None], None, args.tail)
            for d, cfg in configs.items():
                for m, p in cfg.items():
                    nll[f"{d}/{m}"] = nll.get(f"{d}/{m}", 0.0) + chunk_nll(model, row[None], p, args.tail)
            ppl = {k: math.exp(v / (args.tail * (c + 1))) for k, v in nll.items()}
            for d in configs:
                rows[d][str(n)]["perplexity"] = {"dense": ppl["dense"], **{m: ppl[f"{d}/{m}"] for m in configs[d]}}
                rows[d][str(n)]["perplexity_chunks"] = c + 1
            report["missing"].remove(f"N={n} perplexity chunk {c}")
            save(args, report)
        for d in configs:
            cell = rows[d][str(n)]
            print(f"N={n} density {d}: " + json.dumps({k: cell.get(k) for k in ("retrieval", "perplexity")}), flush=True)
        report["seconds_per_length"][str(n)] = time.perf_counter() - t0
        save(args, report)
    return report


def format_table(r: dict[str, Any]) -> str:
    lines = ["| density | N | method | positions read | passkey | multikey | perplexity |", "|---|---|---|---|---|---|---|"]
    for d, per_len in r["rows"].items():
        for n, cell in per_len.items():
            for m in METHODS:
                ret = cell.get("retrieval", {}).get(m, {})
                ppl = cell.get("perplexity", {}).get(m)
                reads = int(n) if m == "dense" else cell["reads"].get(m, float("nan"))
                lines.append(f"| {d} | {n} | {m} | {reads:.0f} | {ret.get('passkey', float('nan')):.2f} | "
                             f"{ret.get('multikey', float('nan')):.2f} | "
                             f"{'-' if ppl is None else format(ppl, '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.moa_longctx", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a Llama-style checkpoint (default: SmolLM2-135M)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--tasks", nargs="*", choices=TASKS, default=list(TASKS), help="retrieval tasks (none: perplexity only)")
    ap.add_argument("--samples", type=int, default=2, help="prompts per task and length (needle depth swept)")
    ap.add_argument("--ppl-chunks", type=int, default=1, help="held-out chunks per length for perplexity (0: none)")
    ap.add_argument("--tail", type=int, default=256, help="perplexity over each chunk's last TAIL tokens")
    ap.add_argument("--plan-dir", type=Path, default=None,
                    help="plans moa-d<density>.json (read when present, else calibrated and kept there)")
    ap.add_argument("--calib-max-len", type=int, default=4096, help="calibration --max-len")
    ap.add_argument("--calib-lengths", default="1024,2048",
                    help="calibration --lengths (where the smallest span's density is well under the budget)")
    ap.add_argument("--calib-validate-length", type=int, default=3072, help="calibration --validate-length")
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--calib-target", choices=("dense", "text"), default="dense")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--min-span", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (seconds; the fast tier runs it)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        from overdrive.testing import tiny_llama

        args.model = args.model or tiny_llama()
        args.densities, args.lengths, args.samples, args.ppl_chunks, args.tail = [0.5], [160, 256], 1, 1, 16
        args.calib_max_len, args.calib_lengths, args.calib_validate_length = 256, "64,128", 96
        args.calib_samples, args.sink, args.min_span = 1, 4, 16
    if args.model is None:
        from overdrive.testing.real import smollm2_135m

        args.model = smollm2_135m()
    torch.set_num_threads(args.threads)
    report = {**header("moa_longctx", "cpu"), "model": str(args.model),
              "command": "python -m overdrive.benchmarks.moa_longctx " + " ".join(argv if argv is not None else sys.argv[1:]),
              "densities": args.densities, "lengths": args.lengths, "tasks": args.tasks, "samples": args.samples,
              "depths": depths(args.samples), "ppl_chunks": args.ppl_chunks, "tail": args.tail,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "text": {"calibration": "Newton, Opticks, the First Book", "perplexity": "the Second and Third Books"},
              "calibration": {}, "plans": {}, "rows": {}, "seconds_per_length": {}, "goals": {},
              "missing": [f"calibration d{d}" for d in args.densities] + [
                  f"N={n} {task} depth {dep:.2f}" for n in args.lengths for task in args.tasks
                  for dep in depths(args.samples)] + [
                  f"N={n} perplexity chunk {c}" for n in args.lengths for c in range(args.ppl_chunks)]}
    with tempfile.TemporaryDirectory(prefix="moa-longctx-") as tmp:
        plan_dir = args.plan_dir or Path(tmp)
        plan_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        run(args, plan_dir, report)
    report["seconds"] = time.perf_counter() - t
    report["load_average_end"] = os.getloadavg()
    save(args, report)
    print(f"{report['device']}  {report['date']}  model {report['model']}  ({report['seconds']:.0f} s)")
    print(format_table(report))
    print(json.dumps(report["goals"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

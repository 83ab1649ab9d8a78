"""One prepared GPU run: every GPU test and GPU benchmark of every method in one command within one budget.

On the GPU machine (torch, Triton and transformers installed; no network), from the repository root::

    python3 plugins/benchmarks/gpu.py --install-from .gpu-wheels --device cuda --out /tmp/gpu-run --pack "$OUT"

(``./run gpu ...`` is the same command). Before the device call, on a machine with the package index::

    python3 plugins/benchmarks/gpu.py --prepare-wheels .gpu-wheels

Steps, in order:

1. ``--install-from DIR``: install the carried wheels (``pip install --no-index --no-deps``) and overdrive
   from this tree (``pip install --no-index --no-deps --no-build-isolation -e .``, skipped when overdrive
   already imports from this tree), then re-run this command as ``python -m overdrive.benchmarks.gpu``;
2. the preflight (also alone: ``--preflight``): CUDA and the GPU, torch / Triton / transformers /
   diffusers versions, overdrive importable from this tree with its methods registered, free disk. With
   ``--device cuda`` and no GPU, or overdrive not importable, nothing is timed;
3. the parts of :data:`PARTS`, in priority order, each in its own subprocess with its own timeout (the
   smaller of its cap and what is left of ``--budget-s``): a part that crashes, hangs or runs out of
   budget is recorded as such and the next one runs;
4. after every part: ``summary.json`` and ``summary.md`` (parts, and every goal of :data:`GOALS` as
   met / not met / not run, from ratios measured in the same run), and with ``--pack DIR`` a copy of
   the two summaries and ``gpu-run.tar.gz`` of the whole output folder in DIR (the device tool returns
   at most 8 files, so DIR=$OUT gets three, and they are there even if the call is cut off).

``--quick --device cpu`` runs every part on tiny shapes (CPU fallbacks of the CUDA-only timing: no CUDA
graphs, no L2 flush): a check that the GPU run cannot die on a typo, run by the test suite.

This file imports only the standard library at the top: the bootstrap (steps 1-2) runs before overdrive
is installed, and the parent never imports torch or initialises CUDA (each part does, in its process).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
MAX_WHEELS_MB = 40
# Packages the GPU image lacks (its package list, read 2026-11-17, is in the device tool's notes): diffusers.
# Its requirements are all in the image (huggingface-hub >= 1.32: 1.33; safetensors >= 0.8: 0.8.0; filelock,
# numpy, Pillow, regex, requests) except importlib_metadata, which diffusers imports only on Python < 3.8
# and which (10.x) would need lazy-importer, also absent: not carried. Pure Python: one wheel serves any
# Python 3.12 machine.
CARRIED = ("diffusers",)
# The GPU machine's Python (python3 there is 3.12.3); pip download needs it named for --only-binary.
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


@dataclasses.dataclass(frozen=True)
class Part:
    """One step of the run: ``target`` ("module:function") is called as ``function(device, quick, out_dir)``
    in a subprocess and returns the report's body (a dict; a ``status`` key overrides "ok")."""
    name: str
    target: str
    est_s: int      # expected seconds on an H100, start-up and compilation included (docs/benchmarks/README.md)
    cap_s: int      # timeout on a GPU (the run's budget may cut it shorter)
    what: str
    quick_cap_s: int = 300  # timeout with --quick (tiny shapes on a CPU that may be shared and slow)

    def cap(self, quick: bool) -> int:
        """The part's timeout for a run with or without ``--quick``."""
        return self.quick_cap_s if quick else self.cap_s


PARTS: tuple[Part, ...] = (
    Part("pytest_gpu", "overdrive.benchmarks.gpu_parts:pytest_gpu", 90, 120,
         "pytest -m gpu over kernels/ and plugins/ (compiled Triton kernels vs references)"),
    Part("gemv", "overdrive.benchmarks.gpu_parts:gemv", 75, 120,
         "W3/W4 group-128, W8A8, W4A8 at M = 1, 16, 256 on 4096x4096, 4096x14336, 14336x4096 vs bf16 and a "
         "copy of the weight bytes (CUDA graphs, L2 flushed)"),
    Part("pmkvq_decode", "overdrive.benchmarks.gpu_parts:pmkvq_decode", 35, 75,
         "PM-KVQ paged decode attention at 8/4/2 bits vs bf16 SDPA decode, context 4k-32k, batch 1-32"),
    Part("moa_span", "overdrive.benchmarks.gpu_parts:moa_span", 30, 75,
         "MoA span attention (prefill 8k/32k, paged decode) vs dense SDPA and a uniform window"),
    Part("ditfastattn_kernel", "overdrive.benchmarks.gpu_parts:ditfastattn_kernel", 25, 60,
         "DiTFastAttn window/arrow kernel vs SDPA at Flux 2K and Wan 480p lengths"),
    Part("ditfastattn_e2e", "overdrive.benchmarks.gpu_parts:ditfastattn_e2e", 60, 120,
         "DiTFastAttn end to end: Flux-width transformer (4 + 8 blocks), 16384 + 512 tokens, 10 steps"),
    Part("viditq", "overdrive.benchmarks.gpu_parts:viditq", 50, 100,
         "ViDiT-Q W8A8 / W4A8 vs bf16 on a Flux-width denoiser (2 + 4 blocks, 4096 + 512 tokens)"),
    Part("vgdfr", "overdrive.benchmarks.gpu_parts:vgdfr", 45, 100,
         "VGDFR on a Wan pipeline with Wan2.1-1.3B widths (6 blocks), bf16, 81 frames 384x384, 10 steps"),
    Part("calibration", "overdrive.benchmarks.gpu_parts:calibration", 90, 150,
         "the calibration benchmark (overdrive.benchmarks.calibration) with 8 samples, when it is importable"),
)
PREFLIGHT = Part("preflight", "overdrive.benchmarks.gpu_parts:preflight", 10, 90,
                 "CUDA, versions, overdrive from this tree, registered methods, disk")


# ------------------------------------------------------------------------------------------------ goals
@dataclasses.dataclass(frozen=True)
class Goal:
    name: str
    text: str
    part: str
    target: float
    measure: Callable[[dict[str, Any]], tuple[float, str]]  # report -> (worst ratio, what it was measured on)


def _worst(rows: list[tuple[float, str]], what: str) -> tuple[float, str]:
    if not rows:
        raise LookupError(f"no {what} in the report")
    v, where = min(rows)
    return v, f"worst of {len(rows)}: {where}; all: " + ", ".join(f"{w} {x:.3g}" for x, w in rows)


def _gemv_rows(r: dict[str, Any], schemes: tuple[str, ...], m: int, key: str) -> list[tuple[float, str]]:
    return [(x[key], f"{x['scheme']} {x['k']}x{x['n']}") for x in r["results"]
            if x["scheme"] in schemes and x["m"] == m and key in x]


def _gemv_m1_speed(r: dict[str, Any]) -> tuple[float, str]:
    return _worst(_gemv_rows(r, ("W3 g128", "W4 g128"), 1, "speedup_vs_bf16"), "W3/W4 M=1 rows")


def _gemv_m1_copy(r: dict[str, Any]) -> tuple[float, str]:
    """Time of a device copy of exactly the op's weight bytes over the op's time (the harness's "copy floor": a
    GEMV cannot stream its weights faster than they can be copied); beside it, the op's weight bytes per
    second over the large-copy ceiling (bytes read + written), a stricter reading."""
    v, detail = _worst(_gemv_rows(r, ("W3 g128", "W4 g128"), 1, "of_copy_floor"), "W3/W4 M=1 rows")
    ceiling = r.get("ceilings", {}).get("copy_gbs")
    if ceiling:
        detail += "; op GB/s / 1 GiB copy ceiling: " + ", ".join(
            f"{w} {x['op_gbs'] / ceiling:.3g}" for x, w in
            ((x, f"{x['scheme']} {x['k']}x{x['n']}") for x in r["results"]
             if x["scheme"] in ("W3 g128", "W4 g128") and x["m"] == 1 and "op_gbs" in x))
    return v, detail


def _gemm_m256(r: dict[str, Any]) -> tuple[float, str]:
    return _worst(_gemv_rows(r, ("W4 g128", "W8A8"), 256, "speedup_vs_bf16"), "W4/W8A8 M=256 rows")


def _kernel_rows(r: dict[str, Any], op: str, shape_has: str) -> list[dict[str, Any]]:
    return [x for x in r["results"] if x["op"] == op and shape_has in x["shape"]]


def _pmkvq_4bit(r: dict[str, Any]) -> tuple[float, str]:
    rows = _kernel_rows(r, "kv_decode_attention", "4-bit")
    ctx = max((int(re.search(r"ctx=(\d+)", x["shape"]).group(1)) for x in rows), default=0)  # 32768 on a GPU
    return _worst([(next(iter(x["speedup_vs"].values())), x["shape"]) for x in rows if f"ctx={ctx} " in x["shape"]],
                  "4-bit rows")


def _moa_span(r: dict[str, Any]) -> tuple[float, str]:
    v, where = _worst([(next(iter(x["speedup_vs"].values())), x["shape"])
                       for x in _kernel_rows(r, "span_paged_attention", "MoA-like")], "MoA-like decode rows")
    pre = [f"{x['shape']} (density {x['density']:.2f}) {next(iter(x['speedup_vs'].values())):.3g}"
           for x in _kernel_rows(r, "span_prefill_attention", "MoA-like")]
    return v, where + ("; prefill: " + ", ".join(pre) if pre else "")


def _viditq(r: dict[str, Any]) -> tuple[float, str]:
    d = r["denoiser"]
    return d["w8a8"]["speedup_vs_bf16"], (f"forward {d['w8a8']['forward_s']} s vs bf16 {d['bf16']['forward_s']} s; "
                                          f"W4A8 {d.get('w4a8', {}).get('speedup_vs_bf16')}x")


DITFASTATTN_GOAL_ROW = "calibrated v1 (threshold 0.1)"


def _ditfastattn_e2e(r: dict[str, Any]) -> tuple[float, str]:
    rows = {x["config"]: x for x in r["rows"]}
    x = rows[DITFASTATTN_GOAL_ROW]
    return x["speedup"], (f"{DITFASTATTN_GOAL_ROW}: {x['median_s']:.3f} s vs {rows['none']['median_s']:.3f} s; all: "
                          + ", ".join(f"{k} {v['speedup']:.3g}" for k, v in rows.items()))


GOALS: tuple[Goal, ...] = (
    Goal("gemv_m1_speed", "W3/W4 GEMV at M = 1 >= 2x bf16 (on the way to 3x)", "gemv", 2.0, _gemv_m1_speed),
    Goal("gemv_m1_copy", "W3/W4 GEMV at M = 1 >= 60% of copy bandwidth (copy time / op time)", "gemv", 0.6,
         _gemv_m1_copy),
    Goal("gemm_m256", "W4/W8A8 at M = 256 >= 1x bf16", "gemv", 1.0, _gemm_m256),
    Goal("pmkvq_4bit", "PM-KVQ 4-bit decode attention >= 1.5x bf16 SDPA at 32k context", "pmkvq_decode", 1.5,
         _pmkvq_4bit),
    Goal("moa_span", "MoA span attention at density 0.5 >= 1.6x dense (paged decode)", "moa_span", 1.6, _moa_span),
    Goal("viditq_w8a8", "ViDiT-Q W8A8 >= 1.4x bf16 on a Flux-width denoiser", "viditq", 1.4, _viditq),
    Goal("ditfastattn_e2e", "DiTFastAttn end to end >= 1.5x on Flux 2K shapes", "ditfastattn_e2e", 1.5,
         _ditfastattn_e2e),
)


def evaluate_goals(out: Path, parts: dict[str, dict[str, Any]], goals: tuple[Goal, ...] = GOALS) -> list[dict]:
    """Each goal as met / not met / not run, from the JSON its part wrote in ``out``."""
    res = []
    for g in goals:
        row: dict[str, Any] = {"goal": g.name, "text": g.text, "part": g.part, "target": g.target}
        rec = parts.get(g.part)
        if rec is not None and rec["status"] == "ok":
            source = rec.get("json", f"{g.part}.json")
        elif rec is not None and rec.get("partial_json"):  # cut off: the rows it measured before
            source = rec["partial_json"]
            row["partial"] = f"part {rec['status']}: from the rows measured before"
        else:
            row.update(status="not run", why=f"part {g.part}: {rec['status'] if rec else 'not reached'}")
            res.append(row)
            continue
        try:
            value, detail = g.measure(json.loads((out / source).read_text()))
            row.update(status="met" if value >= g.target else "not met", value=round(value, 4),
                       detail=(f"({row['partial']}) " if "partial" in row else "") + detail)
        except Exception as e:  # noqa: BLE001 - a report without the rows the goal needs
            row.update(status="not run", why=f"{type(e).__name__}: {e}" + (f" ({row['partial']})" if "partial" in row
                                                                              else ""))
        res.append(row)
    return res


# --------------------------------------------------------------------------------------------- running
def _kill(proc: subprocess.Popen) -> None:
    """End the part's process group (it was started in its own session), politely first."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_part(part: Part, out: Path, device: str, quick: bool, timeout_s: float, python: str = sys.executable,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one part in its own process (and process group) with a timeout; its record for the summary."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{part.name}.log"
    report = out / f"{part.name}.json"
    partial = out / f"{part.name}.partial.json"  # rows so far, if the part writes them (kernel tables do)
    report.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    cmd = [python, "-m", "overdrive.benchmarks.gpu", "--child", part.name, "--target", part.target,
           "--device", device, "--out", str(out)] + (["--quick"] if quick else [])
    rec: dict[str, Any] = {"part": part.name, "what": part.what, "timeout_s": round(timeout_s, 1)}
    t0 = time.monotonic()
    cpu0 = _children_cpu()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
    rec["seconds"] = round(time.monotonic() - t0, 1)
    # user + system seconds of the part's processes (with jobs > 1, of every part that ended meanwhile)
    rec["cpu_seconds"] = round(_children_cpu() - cpu0, 1)
    rec["log"] = f"logs/{part.name}.log"
    if report.exists():  # written last, so complete; a hang or crash after it (process teardown) is noted
        partial.unlink(missing_ok=True)
        body = json.loads(report.read_text())
        rec.update(status=body.get("status", "ok"), json=report.name)
        if body.get("why"):
            rec["why"] = body["why"]
        if rc != 0:
            rec["after_report"] = "killed at the timeout" if rc is None else f"exit code {rc}"
    elif rc is None:
        rec.update(status="timed out", why=f"no result within {timeout_s:.0f} s", log_tail=_tail(log, 600))
    else:
        rec.update(status="failed", rc=rc, why=f"exit code {rc}, no report", log_tail=_tail(log))
    if not report.exists() and partial.exists():
        rec["partial_json"] = partial.name
    return rec


def run_all(parts: tuple[Part, ...] | list[Part], out: Path, budget_s: float, device: str, quick: bool,
            pack: Path | None = None, python: str = sys.executable, env: dict[str, str] | None = None,
            reserve_s: float = 5.0, min_s: float = 10.0, preflight: Part | None = PREFLIGHT,
            goals: tuple[Goal, ...] = GOALS, log: Callable[[str], None] = print, jobs: int = 1) -> dict[str, Any]:
    """Preflight, then every part in order within ``budget_s`` seconds (``reserve_s`` kept for the summary;
    a part is started only with at least ``min_s`` left), ``jobs`` at a time (more than one only on CPU).
    Returns the summary (also written to ``out``)."""
    if jobs > 1 and device != "cpu":
        raise ValueError(f"jobs={jobs}: parts run one at a time on {device} (their timings would share it)")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    deadline = t_start + budget_s
    summary: dict[str, Any] = {"benchmark": "gpu-run", "started": _utc(), "device_requested": device,
                               "quick": quick, "budget_s": budget_s, "commit": _commit(), "preflight": None,
                               "parts": [], "goals": []}

    def run(part: Part, timeout_s: float) -> dict[str, Any]:
        return run_part(part, out, device, quick, timeout_s, python, env)

    def flush() -> None:
        summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
        summary["goals"] = evaluate_goals(out, {p["part"]: p for p in summary["parts"]}, goals)
        _write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        _write(out / "summary.md", format_summary(summary))
        if pack is not None:
            pack_outputs(out, pack)

    if preflight is not None:
        rec = run(preflight, min(preflight.cap(quick), budget_s))
        pf = json.loads((out / "preflight.json").read_text()) if rec["status"] == "ok" else {}
        summary["preflight"] = {**rec, "missing": pf.get("missing"), "checks": pf.get("checks"),
                                "device": pf.get("device")}
        summary["device"] = pf.get("device")
        summary["commit"] = pf.get("commit", summary["commit"])  # the parts' header form (with "+dirty")
        log(format_preflight(summary["preflight"]))
        origin = overdrive_from_tree()
        if pf:
            why = f"preflight: {pf['fatal']}" if pf.get("fatal") else None
        elif origin is None or not Path(origin).resolve().is_relative_to(ROOT / "plugins"):
            why = f"preflight {rec['status']}: overdrive is not importable from this tree ({origin}); see logs/preflight.log"
        else:  # the preflight itself broke: say so, but do not give up the parts (the device time is scarce)
            why = None
            log(f"[gpu] preflight {rec['status']} ({rec.get('why', '')}); going on with the parts")
        if why:
            summary["stopped"] = why
            log(f"[gpu] nothing timed: {why}")
            flush()
            return summary
    records: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    queue = list(parts)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                part = queue.pop(0)
                left = deadline - time.monotonic() - reserve_s
                if left < min_s:
                    records[part.name] = {"part": part.name, "what": part.what, "status": "not run",
                                          "why": f"out of budget ({max(left, 0):.0f} s left of {budget_s:.0f})"}
                    log(f"[gpu] {part.name}: not run (out of budget)")
                    summary["parts"] = [records[p.name] for p in parts if p.name in records]
                    flush()
                    continue
                timeout = min(float(part.cap(quick)), left)
                log(f"[gpu] {part.name}: running (timeout {timeout:.0f} s, {left:.0f} s of budget left)")
            rec = run(part, timeout)
            with lock:
                records[part.name] = rec
                log(f"[gpu] {part.name}: {rec['status']} in {rec['seconds']} s"
                    + (f" ({rec['why']})" if rec.get("why") else ""))
                summary["parts"] = [records[p.name] for p in parts if p.name in records]
                flush()

    # jobs > 1 only for --quick on CPU (the test suite): parts timed on one GPU must not share it
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary["parts"] = [records[p.name] for p in parts if p.name in records]
    flush()
    return summary


def _utc() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _commit() -> str | None:
    if os.environ.get("OVERDRIVE_COMMIT"):
        return os.environ["OVERDRIVE_COMMIT"]
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _write(path: Path, text: str) -> None:
    """Atomic write (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def pack_outputs(out: Path, pack: Path) -> list[Path]:
    """summary.json, summary.md and gpu-run.tar.gz (the whole of ``out``) into ``pack``: three files, so that
    the device tool (at most 8 files back) returns everything."""
    pack.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=pack, prefix=".gpu-run.tar.gz.")
    os.close(fd)
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname="gpu-run", filter=lambda ti: None if Path(ti.name).name.startswith(".") else ti)
    os.chmod(tmp, 0o644)
    os.replace(tmp, pack / "gpu-run.tar.gz")
    copied = [pack / "gpu-run.tar.gz"]
    for name in ("summary.json", "summary.md"):
        if (out / name).exists() and (out / name).resolve() != (pack / name).resolve():
            _write(pack / name, (out / name).read_text())
        copied.append(pack / name)
    return copied


# --------------------------------------------------------------------------------------------- reports
def format_preflight(pf: dict[str, Any] | None) -> str:
    if not pf:
        return "preflight: not run"
    lines = [f"preflight ({pf.get('status')}, {pf.get('seconds')} s): device {pf.get('device')}"]
    for c in pf.get("checks") or []:
        mark = "ok  " if c["ok"] else ("MISS" if c.get("required") else "warn")
        lines.append(f"  {mark} {c['name']}: {c['value']}")
    if pf.get("status") not in ("ok", None):
        lines.append(f"  {pf.get('why', '')} {pf.get('log_tail', '')[-600:]}")
    if pf.get("missing"):
        lines.append(f"  missing: {', '.join(pf['missing'])}")
    return "\n".join(lines)


def format_summary(s: dict[str, Any]) -> str:
    pf = s.get("preflight") or {}
    lines = [f"# GPU run: {s.get('device') or s['device_requested']}, {s['started']}, commit {s.get('commit')}",
             "",
             f"Budget {s['budget_s']:.0f} s, used {s.get('elapsed_s', 0):.0f} s"
             + (" (quick: tiny shapes, not a measurement)" if s["quick"] else "")
             + (f". Preflight: missing {', '.join(pf['missing'])}" if pf.get("missing") else "")
             + (f". Stopped: {s['stopped']}" if s.get("stopped") else ""), "",
             "| part | status | seconds (timeout) | report | note |", "|---|---|---|---|---|"]
    for p in s["parts"]:
        note = ((p.get("why") or "") + (f"; rows so far in {p['partial_json']}" if p.get("partial_json") else "")
                ).replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {p['part']} | {p['status']} | {p.get('seconds', '-')} ({p.get('timeout_s', '-')}) | "
                     f"{p.get('json', '-')} | {note} |")
    lines += ["", "| goal | target | measured (worst case) | status |", "|---|---|---|---|"]
    for g in s["goals"]:
        val = f"{g['value']:.3g}" if "value" in g else "-"
        lines.append(f"| {g['text']} | {g['target']} | {val} | {g['status']}{' (partial)' if 'partial' in g else ''} |")
    lines += ["", "Goal details:"]
    for g in s["goals"]:
        lines.append(f"- {g['goal']}: {g.get('detail') or g.get('why', '')}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- the child
def child(name: str, target: str, device: str, quick: bool, out: Path) -> int:
    """Inside a part's process: call the target, write ``<out>/<name>.json`` with the shared report header."""
    module, _, func = target.partition(":")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    body = getattr(importlib.import_module(module), func)(device, quick, out)
    import torch

    from overdrive.benchmarks import header, write_json

    # the machine it ran on (a preflight asked for CUDA where there is none still reports); the part's own
    # header (benchmark name, device, date) wins over the generic one
    where = device if not device.startswith("cuda") or torch.cuda.is_available() else "cpu"
    report = {**header(f"gpu-{name}", where), "part": name, "quick": quick, **body,
              "part_seconds": round(time.monotonic() - t0, 2)}
    write_json(out / f"{name}.json", report, indent=1)
    return 0


# ------------------------------------------------------------------------------------- wheels + install
def carried_specs() -> list[str]:
    """``name==version`` of every carried wheel: diffusers at the version requirements/engines.txt pins,
    the others at the version installed here."""
    pins = {}
    for line in (ROOT / "requirements" / "engines.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    specs = []
    for name in CARRIED:
        version = pins.get(_norm(name))
        if version is None:
            try:
                version = md.version(name)
            except md.PackageNotFoundError:
                raise SystemExit(f"--prepare-wheels: no version for {name}: pin it in requirements/engines.txt "
                                 "or install it here") from None
        specs.append(f"{name}=={version}")
    return specs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_name_version(path: Path) -> tuple[str, str]:
    parts = path.name.split("-")
    return _norm(parts[0]), parts[1]


def check_wheels(wheel_dir: Path, limit_mb: float = MAX_WHEELS_MB) -> dict[str, Any]:
    """The wheels in ``wheel_dir``, their total size, and what is wrong (two versions of one package stop
    the whole install; over ``limit_mb`` does not fit the device call beside the tree)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    seen: dict[str, list[str]] = {}
    for w in wheels:
        n, v = _wheel_name_version(w)
        seen.setdefault(n, []).append(v)
    problems = [f"{n}: {len(v)} versions ({', '.join(v)}); keep one" for n, v in seen.items() if len(v) > 1]
    if total > limit_mb * 2**20:
        problems.append(f"{total / 2**20:.1f} MB of wheels, over the {limit_mb} MB limit")
    return {"wheels": [w.name for w in wheels], "total_mb": round(total / 2**20, 2), "problems": problems}


def prepare_wheels(dest: Path, specs: list[str] | None = None, python: str = sys.executable,
                   runner: Callable[..., Any] = subprocess.run) -> dict[str, Any]:
    """Download the carried wheels for the GPU machine into ``dest`` (``pip download --no-deps``; a wheel
    already there is kept), check them, and write ``dest/COMMIT`` (the tree's commit: the copy on the
    device has no .git)."""
    dest.mkdir(parents=True, exist_ok=True)
    specs = specs if specs is not None else carried_specs()
    have = {_wheel_name_version(w) for w in dest.glob("*.whl")}
    for spec in specs:
        name, _, version = spec.partition("==")
        if (_norm(name), version) in have:
            continue
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
               "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "--disable-pip-version-check",
               "-d", str(dest), spec]
        runner(cmd, check=True)
    info = check_wheels(dest)
    commit = _commit()
    if commit:
        _write(dest / "COMMIT", commit + "\n")
    info["commit"] = commit
    if info["problems"]:
        raise SystemExit(f"--prepare-wheels {dest}: " + "; ".join(info["problems"]))
    return info


def install_commands(wheel_dir: Path, python: str = sys.executable, target: Path | None = None,
                     editable: Path | None = ROOT) -> list[list[str]]:
    """The offline install: the carried wheels (``--target`` for a throwaway folder), then this tree editable
    (entry points included: the registry finds the methods through them)."""
    pip = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check", "-q"]
    wheels = sorted(str(w) for w in wheel_dir.glob("*.whl"))
    cmds = []
    if wheels:
        cmds.append([*pip, "--no-compile", *(["--target", str(target)] if target else []), *wheels])
    if editable is not None:
        cmds.append([*pip, "--no-build-isolation", "-e", str(editable)])
    return cmds


def overdrive_from_tree() -> str | None:
    """Where ``overdrive`` would be imported from, without importing it (None: not importable)."""
    spec = importlib.util.find_spec("overdrive")
    return spec.origin if spec is not None else None


def install(wheel_dir: Path, python: str = sys.executable, log: Callable[[str], None] = print) -> None:
    info = check_wheels(wheel_dir)
    log(f"[gpu] carried wheels in {wheel_dir}: {', '.join(info['wheels']) or 'none'} ({info['total_mb']} MB)")
    if info["problems"]:
        raise SystemExit(f"[gpu] {wheel_dir}: " + "; ".join(info["problems"]))
    origin = overdrive_from_tree()
    here = origin is not None and Path(origin).resolve().is_relative_to(ROOT / "plugins")
    for cmd in install_commands(wheel_dir, python, editable=None if here else ROOT):
        log(f"[gpu] $ {' '.join(cmd[:9])} ...")
        subprocess.run(cmd, check=True, cwd=ROOT)
    commit_from(wheel_dir)


def commit_from(wheel_dir: Path) -> None:
    """In a copy of the tree without .git, take the commit the wheel folder was prepared at (its COMMIT file)
    as ``$OVERDRIVE_COMMIT``, which every report's header then carries."""
    commit_file = wheel_dir / "COMMIT"
    if _commit() is None and commit_file.exists():
        os.environ["OVERDRIVE_COMMIT"] = f"{commit_file.read_text().strip()} (from {wheel_dir.name}/COMMIT)"


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (every part's JSON and log, summaries)")
    ap.add_argument("--pack", type=Path, default=None,
                    help="also keep summary.json, summary.md and gpu-run.tar.gz here (e.g. $OUT of the device tool)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run (default 540)")
    ap.add_argument("--device", default=None, help="cuda (default when there is a GPU) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a check of every part, not a measurement")
    ap.add_argument("--only", nargs="*", choices=[p.name for p in PARTS], help="run these parts only (in order)")
    ap.add_argument("--skip", nargs="*", default=[], choices=[p.name for p in PARTS], help="leave these parts out")
    ap.add_argument("--jobs", type=int, default=1, help="parts at a time (CPU only: a faster --quick check)")
    ap.add_argument("--preflight", action="store_true", help="only list what is there and what is missing")
    ap.add_argument("--install-from", type=Path, default=None, metavar="DIR",
                    help="first install the wheels in DIR and overdrive from this tree, offline")
    ap.add_argument("--prepare-wheels", type=Path, default=None, metavar="DIR",
                    help="download the wheels the GPU machine lacks into DIR (needs the package index), then stop")
    ap.add_argument("--list", action="store_true", help="print the parts with their GPU time estimates")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        return child(args.child, args.target, args.device, args.quick, args.out)
    if args.list:
        for p in (PREFLIGHT, *PARTS):
            print(f"{p.name:20s} ~{p.est_s:4d} s (cap {p.cap_s:3d} s)  {p.what}")
        print(f"{'total':20s} ~{sum(p.est_s for p in (PREFLIGHT, *PARTS)):4d} s")
        return 0
    if args.prepare_wheels:
        info = prepare_wheels(args.prepare_wheels)
        print(f"[gpu] {args.prepare_wheels}: {', '.join(info['wheels'])} ({info['total_mb']} MB), commit {info['commit']}")
        return 0
    if args.install_from:
        t0 = time.time()
        install(args.install_from)
        rest = _drop_option(sys.argv[1:] if argv is None else list(argv), "--install-from")
        # a fresh interpreter sees the new installs (and imports overdrive as a package, not this script);
        # the install's time counts against the budget (the whole command must end within the device's limit)
        return subprocess.run([sys.executable, "-m", "overdrive.benchmarks.gpu", *rest], cwd=ROOT,
                              env={**os.environ, "OVERDRIVE_GPU_RUN_T0": str(t0)}).returncode
    if os.environ.get("OVERDRIVE_GPU_RUN_T0"):
        spent = time.time() - float(os.environ.pop("OVERDRIVE_GPU_RUN_T0"))
        print(f"[gpu] install took {spent:.0f} s: budget {args.budget_s:.0f} -> {args.budget_s - spent:.0f} s", flush=True)
        args.budget_s -= spent
    commit_from(ROOT / ".gpu-wheels")
    device = args.device or _default_device()
    out = args.out or Path(tempfile.mkdtemp(prefix="overdrive-gpu-run-"))
    if args.preflight:
        s = run_all([], out, args.budget_s, device, args.quick, args.pack)
        pf = s["preflight"] or {}
        required_missing = [c["name"] for c in pf.get("checks") or [] if c["required"] and not c["ok"]]
        return 0 if pf.get("status") == "ok" and not required_missing and not s.get("stopped") else 1
    parts = [p for p in PARTS if (args.only is None or p.name in args.only) and p.name not in args.skip]
    print(f"[gpu] {len(parts)} parts on {device}, budget {args.budget_s:.0f} s, output {out}", flush=True)
    s = run_all(parts, out, args.budget_s, device, args.quick, args.pack,
                log=lambda m: print(m, flush=True), jobs=args.jobs)
    print(format_summary(s))
    return 1 if s.get("stopped") else 0  # parts that failed are in the summary; a run that could not start is not


def _drop_option(argv: list[str], opt: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == opt:
            skip = True
        elif not a.startswith(opt + "="):
            out.append(a)
    return out


def _default_device() -> str:
    """cuda when an NVIDIA GPU is visible (nvidia-smi lists one, or its device file is there), else cpu; the
    parent never initialises CUDA. The documented command names ``--device cuda``, so that a GPU the
    preflight cannot use stops the run instead of timing nothing on the CPU."""
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if r.returncode == 0 and "GPU" in r.stdout:
            return "cuda"
    return "cuda" if Path("/dev/nvidia0").exists() else "cpu"


if __name__ == "__main__":
    if not __package__:  # run as a file (the bootstrap): do not import this folder's modules as top-level ones
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    raise SystemExit(main())

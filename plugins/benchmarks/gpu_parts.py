"""The parts of the one-command GPU run (:mod:`overdrive.benchmarks.gpu`), each ``part(device, quick, out_dir) -> dict``.

Every part calls an existing benchmark's entry point with the GPU run's shapes (``quick``: the tiny
shapes its own ``--quick`` uses, on CPU through the torch references) and returns the report body; the
runner adds the shared header (device, date, commit, versions) and writes ``<out_dir>/<part>.json``. A
part runs in its own process: it may initialise CUDA, crash or hang without harming the others.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

# PM-KVQ decode grid on a GPU: (batch rows, context) from 4k to 32k and 1 to 32 rows
PMKVQ_SHAPES = [(1, 4096), (1, 32768), (8, 8192), (8, 32768), (32, 4096), (32, 32768)]
GEMV_MS = (1, 16, 256)
DITFASTATTN_E2E_ROWS = ["arrow k=16 (all heads, steps >= 1)", "ast (steps >= 1)", "calibrated v1 (threshold 0.1)"]
VGDFR_ROWS = ["VGDFR keep 0.75", "VGDFR keep 0.75, latent estimate", "VGDFR keep 0.5"]


def _dev(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    return dev


# -------------------------------------------------------------------------------------------- preflight
def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def preflight(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """What the run needs, found or missing, before anything is timed. ``fatal`` stops the run."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, value: Any, required: bool = True) -> None:
        checks.append({"name": name, "ok": bool(ok), "value": value, "required": required})

    cuda = device.startswith("cuda")
    check("python", sys.version_info >= (3, 10), sys.version.split()[0])
    check("torch", True, torch.__version__)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        check("cuda device", True, f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                   f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free, CUDA {torch.version.cuda}")
    else:
        check("cuda device", not cuda, "none (torch.cuda.is_available() is False)", required=cuda)
    try:
        import triton

        check("triton", True, triton.__version__, required=cuda)
    except Exception as e:  # noqa: BLE001 - reported
        check("triton", False, f"{type(e).__name__}: {e}", required=cuda)
    for dist, needed_by in (("transformers", "calibration"), ("diffusers", "ditfastattn_e2e, viditq, vgdfr"),
                            ("pytest", "pytest_gpu"), ("pytest-timeout", "pytest_gpu (per-test timeout)"),
                            ("pluggy", "overdrive"), ("safetensors", "overdrive")):
        v = _version(dist)
        ok = v is not None
        if ok and dist == "diffusers" and not quick:  # installed is not enough: it must import with this torch
            try:
                importlib.import_module("diffusers")
            except Exception as e:  # noqa: BLE001 - reported
                ok, v = False, f"{v}, import fails: {type(e).__name__}: {str(e)[:200]}"
        check(dist, ok, v or f"missing (needed by {needed_by})", required=dist in ("pluggy", "safetensors"))
    import overdrive

    origin = Path(overdrive.__file__).resolve()
    from_tree = origin.is_relative_to(ROOT / "plugins")
    check("overdrive from this tree", from_tree, str(origin.parent))
    from overdrive.registry import get_registry

    reg = get_registry()
    check("methods registered", len(reg.names()) > 0 and not reg.failures,
          ", ".join(reg.names()) + (f"; failures: {reg.failures}" if reg.failures else ""))
    from overdrive.kernels.dispatch import active_backend

    check("kernel backend", True, active_backend(torch.device(device)), required=False)
    for where in (out_dir, Path(tempfile_dir())):
        free = shutil.disk_usage(where).free
        check(f"disk free at {where}", free > 2 * 2**30, f"{free / 2**30:.1f} GiB", required=False)
    missing = [c["name"] for c in checks if not c["ok"]]
    fatal = None
    if cuda and not torch.cuda.is_available():
        fatal = "no CUDA device"
    elif not from_tree:
        fatal = f"overdrive imports from {origin.parent}, not from this tree ({ROOT}): run with --install-from DIR"
    from overdrive.benchmarks import device_name

    return {"device": device_name(device) if not cuda or torch.cuda.is_available() else device_name("cpu"),
            "checks": checks, "missing": missing, "fatal": fatal}


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


# ----------------------------------------------------------------------------------------------- pytest
def pytest_gpu(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """``pytest -m gpu`` over kernels/ and plugins/ (quick: one small file, so the path is exercised; on a CPU
    its gpu tests are skipped). Counts from the JUnit XML; test failures make the part "failed"."""
    paths = ["kernels/tests/test_packing.py"] if quick else ["kernels", "plugins"]
    xml = out_dir / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={xml}", *paths]
    if _version("pytest-timeout"):
        cmd.append("--timeout=120")
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(r.stdout[-20000:], r.stderr[-5000:], sep="\n", flush=True)
    res: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": r.returncode,
                           "seconds": round(time.monotonic() - t0, 1), "summary_line": r.stdout.strip().splitlines()[-1:]}
    if not xml.exists():
        return {**res, "status": "failed", "why": f"pytest exit code {r.returncode}, no JUnit XML"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failing.append(f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    res.update(passed=passed, failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"],
               failing=failing)
    # exit code 5: nothing collected (a CPU machine deselects and skips everything): not a failure
    if counts["failures"] or counts["errors"] or r.returncode not in (0, 5):
        res.update(status="failed", why=f"{counts['failures']} failed, {counts['errors']} errors, {passed} passed")
    return res


# ------------------------------------------------------------------------------------------------ kernels
def _partial(out_dir: Path, part: str, device: str) -> Any:
    """A callback writing ``<out_dir>/<part>.partial.json`` (the rows so far, with the report header) after each
    case: a part cut off at its timeout keeps what it measured (the runner reads it then)."""
    from overdrive.benchmarks import header, write_json

    head = header(f"gpu-{part}", device, partial=True)

    def write(rows: list[dict[str, Any]]) -> None:
        write_json(Path(out_dir) / f"{part}.partial.json", {**head, "results": rows}, indent=1)
    return write


def gemv(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """The W3/W4/W8A8/W4A8 GEMV/GEMM table at M = 1, 16, 256 (CUDA graphs with L2 flush on a GPU; on CPU the
    same table with ``perf_counter`` timing)."""
    from overdrive.benchmarks import kernels_gemv

    dev = _dev(device)
    reps = 3 if quick else (50 if dev.type == "cuda" else 10)
    return kernels_gemv.run(dev, quick, reps, ms=GEMV_MS, on_row=_partial(out_dir, "gemv", device))


def _kernel_table(part: str, op: str, device: str, quick: bool, out_dir: Path,
                  case_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One op's table from :mod:`overdrive.benchmarks.kernels`, rows written as they come (:func:`_partial`)."""
    from overdrive.benchmarks import kernels

    return kernels.run([op], _dev(device), quick, case_options=case_options or {},
                       on_result=_partial(out_dir, part, device))


def pmkvq_decode(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """PM-KVQ paged decode attention at 8/4/2 bits vs bf16 SDPA decode over :data:`PMKVQ_SHAPES`."""
    opts = {"kv_decode_attention": {"shapes": PMKVQ_SHAPES}} if _dev(device).type == "cuda" else {}
    return _kernel_table("pmkvq_decode", "kv_decode_attention", device, quick, out_dir, opts)


def moa_span(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """MoA per-head span attention (prefill and paged decode) vs dense SDPA and a uniform window."""
    return _kernel_table("moa_span", "span_attention", device, quick, out_dir)


# ------------------------------------------------------------------------------------------------ methods
def ditfastattn_kernel(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """DiTFastAttn's window/arrow kernel vs SDPA (FlexAttention left out: its first call compiles for minutes)."""
    from overdrive.benchmarks import ditfastattn_gpu

    _dev(device)
    return ditfastattn_gpu.run_kernel(device, quick, flex=False)


def ditfastattn_e2e(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """Flux-width pipeline (4 + 8 blocks) at 16384 + 512 tokens, 10 steps: none, arrow k=16, AST and the
    calibrated v1 plan (the row the goal reads). Quick: the script's tiny CPU pipeline, 2 steps."""
    from overdrive.benchmarks import ditfastattn_gpu

    if not quick:
        _dev(device)
    return ditfastattn_gpu.run_e2e(4, 8, 2 if quick else 10, tiny=quick, repeats=1 if quick else 2,
                                   only=DITFASTATTN_E2E_ROWS[-1:] if quick else DITFASTATTN_E2E_ROWS)


def viditq(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """ViDiT-Q W8A8 / W4A8 vs bf16 on a Flux-width denoiser (2 double + 4 single blocks)."""
    from overdrive.benchmarks import viditq_gpu

    _dev(device)
    return viditq_gpu.run(quick, 1 if quick else 2, 1 if quick else 4, 1 if quick else 10, device)


def vgdfr(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """VGDFR on a Wan pipeline with Wan2.1-1.3B widths (6 blocks) in bf16: none and keep 0.75 / 0.5."""
    from overdrive.benchmarks import vgdfr as bench

    dev = _dev(device)
    if quick:
        return bench.run(True, device, "float32", size=32, frames=9, steps=3, compress=1, only=VGDFR_ROWS[:1],
                         seeds=(1,))
    return bench.run(False, device, "bfloat16" if dev.type == "cuda" else "float32", size=384, frames=81, steps=10,
                     compress=2, transformer={**bench.WAN_1_3B_WIDTHS, "num_layers": 6}, only=VGDFR_ROWS)


# calibration samples in the GPU run when the benchmark takes a count: its full run (128 samples of a
# Llama-3-8B-shaped model, goal <= 10 minutes) does not fit beside the other parts in one device call
CALIBRATION_SAMPLES = 8


def calibration(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """The calibration benchmark, ``overdrive.benchmarks.calibration.run(device, quick, out_dir)``, when it is
    there ("not available" otherwise); on a GPU with :data:`CALIBRATION_SAMPLES` samples if it takes a count."""
    import inspect

    try:
        mod = importlib.import_module("overdrive.benchmarks.calibration")
    except ModuleNotFoundError as e:
        if e.name != "overdrive.benchmarks.calibration":
            raise
        return {"status": "not available", "why": "overdrive.benchmarks.calibration is not in this tree"}
    kw: dict[str, Any] = {}
    if not quick and "samples" in inspect.signature(mod.run).parameters:
        kw["samples"] = CALIBRATION_SAMPLES
    body = mod.run(device, quick, Path(out_dir), **kw)
    if kw:
        body = {**body, "gpu_run_note": f"samples reduced to {CALIBRATION_SAMPLES} to fit the one GPU run; the full "
                                        "run is `python -m overdrive.benchmarks.calibration --device cuda`"}
    return body

"""Kernel benchmarks: an op and its baselines timed in the same run, against measured ceilings.

    python -m overdrive.kernels.bench [--op NAME ...] [--json OUT] [--quick]

For each case: median time of the op and of each baseline (CUDA events on GPU; ``perf_counter`` with
warm-up on CPU), the ratio baseline/op, and the achieved bandwidth and FLOP rate as a fraction of
ceilings measured in the same run: a device-to-device copy of a large buffer (bandwidth) and a large
matmul (compute; bf16 on GPU, fp32 on CPU where bf16 matmul is not what the hardware is built for).
Absolute numbers mean something only with the device name, which the JSON records.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import int8_weight_linear, int8_weight_linear_reference, pack, unpack
from .dispatch import active_backend


# ----------------------------------------------------------------------------------- timing
def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``fn``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclasses.dataclass
class Ceilings:
    bandwidth_gbs: float   # bytes read + written per second by a large copy, GB/s
    flops: float           # large-matmul FLOP/s
    matmul_dtype: str


def measure_ceilings(device: torch.device, quick: bool = False) -> Ceilings:
    n = (64 if quick else 256) * 2**20 // 4 if device.type == "cpu" else 2**30 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats=5 if quick else 10)
    bw = 2 * src.numel() * 4 / t / 1e9
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = 8192 if device.type == "cuda" else (512 if quick else 1024)
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, repeats=5 if quick else 10)
    return Ceilings(bw, 2 * m**3 / t, str(dtype).removeprefix("torch."))


# ------------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Case:
    op: str
    shape: str
    fn: Callable[[], Any]
    baselines: dict[str, Callable[[], Any]]
    bytes_moved: int
    flops: int


def int8_linear_cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = [(1, 4096, 4096), (16, 4096, 4096), (512, 4096, 4096)] if device.type == "cuda" else \
        ([(1, 1024, 1024), (64, 1024, 1024)] if quick else [(1, 2048, 2048), (16, 2048, 2048), (256, 2048, 2048)])
    cases = []
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        q = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        s = torch.rand(n, device=device) / 50
        w_dense = (q.float() * s[:, None]).to(dtype)
        cases.append(Case(
            "int8_weight_linear", f"M={m} K={k} N={n} {str(dtype).removeprefix('torch.')}",
            lambda x=x, q=q, s=s: int8_weight_linear(x, q, s),
            {"dequantize+matmul": lambda x=x, q=q, s=s: int8_weight_linear_reference(x, q, s),
             "dense matmul (16/32-bit W)": lambda x=x, w=w_dense: x @ w.T},
            bytes_moved=n * k + m * k * x.element_size() + m * n * x.element_size() + n * 4,
            flops=2 * m * n * k))
    return cases


def group_linear_cases(device: torch.device, quick: bool) -> list[Case]:
    """MBQ W3/W4 group-128 dequant GEMV/GEMM at 7B-class layer shapes vs a 16-bit matmul."""
    from . import group_linear
    from .packing import packed_length

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        layer_shapes = [(4096, 4096), (4096, 11008), (4096, 14336), (11008, 4096), (14336, 4096)]
        ms = (1, 4, 16, 256)
    else:  # CPU: the reference path at reduced sizes (a correctness fallback, see docs/benchmarks)
        layer_shapes = [(1024, 1024)] if quick else [(2048, 2048)]
        ms = (1, 16)
    cases = []
    for bits in (3, 4):
        for k, n in layer_shapes:
            qw = torch.randint(-2**31, 2**31 - 1, (n, packed_length(k, bits)), dtype=torch.int32, device=device)
            sc = (torch.rand(n, k // 128, device=device) / 50).to(dtype)
            zr = torch.randint(0, 1 << bits, (n, k // 128), dtype=torch.uint8, device=device)
            w16 = torch.randn(n, k, device=device, dtype=dtype)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                weight_bytes = qw.numel() * 4 + sc.numel() * sc.element_size() + zr.numel()
                cases.append(Case(
                    "group_linear", f"W{bits} M={m} K={k} N={n}",
                    lambda x=x, qw=qw, sc=sc, zr=zr, bits=bits: group_linear(x, qw, sc, zr, bits, 128),
                    {f"{str(dtype).removeprefix('torch.')} matmul": lambda x=x, w=w16: x @ w.T},
                    bytes_moved=weight_bytes + (m * k + m * n) * x.element_size(), flops=2 * m * n * k))
    return cases


def act8_linear_cases(device: torch.device, quick: bool) -> list[Case]:
    """W8A8 / W4A8 int8 GEMM with fused per-token activation quantization vs a 16-bit matmul."""
    from . import act8_linear
    from .packing import packed_length

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(4096, 4096), (4096, 11008)] if device.type == "cuda" else ([(512, 512)] if quick else [(1024, 1024)])
    ms = (1, 16, 256) if device.type == "cuda" else (1, 16)
    cases = []
    for wbits in (8, 4):
        for k, n in shapes:
            q = (torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device) if wbits == 8 else
                 torch.randint(-2**31, 2**31 - 1, (n, packed_length(k, 4)), dtype=torch.int32, device=device))
            ws = torch.rand(n, device=device) / 50
            w16 = torch.randn(n, k, device=device, dtype=dtype)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                cases.append(Case(
                    "act8_linear", f"W{wbits}A8 M={m} K={k} N={n}",
                    lambda x=x, q=q, ws=ws, wbits=wbits: act8_linear(x, q, ws, wbits),
                    {f"{str(dtype).removeprefix('torch.')} matmul": lambda x=x, w=w16: x @ w.T},
                    bytes_moved=q.numel() * q.element_size() + ws.numel() * 4 + (m * k + m * n) * x.element_size(),
                    flops=2 * m * n * k))
    return cases


def unpack_cases(device: torch.device, quick: bool) -> list[Case]:
    rows, cols = (4096, 4096) if device.type == "cuda" else ((256, 2048) if quick else (1024, 4096))
    cases = []
    for bits in (3, 4):
        codes = torch.randint(0, 1 << bits, (rows, cols))
        p = pack(codes, bits).to(device)
        copy_src = torch.empty(rows * cols, dtype=torch.uint8, device=device)
        copy_dst = torch.empty_like(copy_src)
        cases.append(Case(
            "unpack", f"{rows}x{cols} {bits}-bit",
            lambda p=p, bits=bits: unpack(p, bits, cols),
            {"uint8 copy of the output size": lambda: copy_dst.copy_(copy_src)},
            bytes_moved=p.numel() * 4 + rows * cols, flops=0))
    return cases


CASES = {"act8_linear": act8_linear_cases, "group_linear": group_linear_cases, "int8_weight_linear": int8_linear_cases, "unpack": unpack_cases}


def run(ops: list[str], device: torch.device, quick: bool = False) -> dict[str, Any]:
    ceil = measure_ceilings(device, quick)
    results = []
    for op in ops:
        for c in CASES[op](device, quick):
            t = time_fn(c.fn, device, repeats=5 if quick else 20)
            base = {name: time_fn(fn, device, repeats=5 if quick else 20) for name, fn in c.baselines.items()}
            results.append({
                "op": c.op, "shape": c.shape, "seconds": t,
                "speedup_vs": {name: bt / t for name, bt in base.items()},
                "baseline_seconds": base,
                "bandwidth_gbs": c.bytes_moved / t / 1e9,
                "bandwidth_of_ceiling": c.bytes_moved / t / 1e9 / ceil.bandwidth_gbs,
                "flops": c.flops / t if c.flops else None,
                "flops_of_ceiling": (c.flops / t) / ceil.flops if c.flops else None,
            })
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "triton": _triton_version(),
        "backend": active_backend(device), "ceilings": dataclasses.asdict(ceil), "results": results,
    }


def _triton_version() -> str | None:
    try:
        import importlib.metadata as md

        return md.version("triton")
    except Exception:  # noqa: BLE001
        return None


def format_report(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    lines = [f"device: {r['device']}  torch {r['torch']}  triton {r['triton']}  backend: {r['backend']}  {r['date']}",
             f"ceilings (same run): copy {c['bandwidth_gbs']:.1f} GB/s, {c['matmul_dtype']} matmul {c['flops'] / 1e12:.3f} TFLOP/s",
             "", f"{'op':20s} {'shape':28s} {'time':>10s}  {'GB/s (of ceil)':>16s}  {'TFLOP/s (of ceil)':>18s}  speedup vs baselines"]
    for x in r["results"]:
        bw = f"{x['bandwidth_gbs']:.1f} ({x['bandwidth_of_ceiling']:.0%})"
        fl = f"{x['flops'] / 1e12:.3f} ({x['flops_of_ceiling']:.0%})" if x["flops"] else "-"
        sp = ", ".join(f"{k}: {v:.2f}x" for k, v in x["speedup_vs"].items())
        lines.append(f"{x['op']:20s} {x['shape']:28s} {x['seconds'] * 1e3:8.3f}ms  {bw:>16s}  {fl:>18s}  {sp}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--op", nargs="*", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    args = ap.parse_args(argv)
    r = run(args.op, torch.device(args.device), args.quick)
    print(format_report(r))
    if args.json:
        from overdrive.config import atomic_write_text

        atomic_write_text(args.json, json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

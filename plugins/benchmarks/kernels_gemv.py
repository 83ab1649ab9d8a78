"""Quantized GEMV/GEMM benchmark for MBQ's formats against a bf16 matmul and a same-size copy, one run.

    python -m overdrive.benchmarks.kernels_gemv [--json OUT] [--quick] [--device cuda|cpu]

Cases: W3 / W4 group-128 ``group_linear_kn`` (the split-K GEMV at M = 1, split-K / tiled GEMM above)
and W8A8 / W4A8 ``act8_linear`` on 4096x4096, 4096x14336 and 14336x4096 layers at M = 1, 4, 16,
64, 256, 1024. For each case, in the same run:

* the op, a bf16 ``F.linear`` on a dense weight of the same shape, and a device copy of exactly the
  op's weight bytes (the bandwidth floor of a weight-streaming GEMV);
* on CUDA every timing is a CUDA graph of ``reps`` launches, each preceded by a write of a buffer
  twice the L2 size (cold L2, as in a real decode step where other layers evicted this one); the
  graph of the flushes alone is timed too and subtracted; Triton configs are tuned before capture;
* ceilings from the same run: the copy bandwidth of a 1 GiB buffer and a large bf16 matmul.

The JSON records the device name, torch/Triton versions, date and every time. If vLLM is importable,
its own kernels are not timed here (vLLM cannot be installed on the GPU machines this project uses);
the JSON says so. On CPU (``--quick``: tiny shapes) the ops are the torch references and times are
``perf_counter`` medians: a smoke run of the harness, not a measurement of the kernels.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

GOALS = ("W3/W4 GEMV at M = 1 on 4096x4096 and 4096x14336: >= 2x faster than bf16 (on the way to 3x); "
         "W4/W8A8 at M >= 256: no slower than bf16)")


@dataclasses.dataclass
class Timer:
    device: torch.device
    reps: int
    flush_bytes: int

    def __post_init__(self) -> None:
        self.flush_buf = (torch.empty(self.flush_bytes // 4, dtype=torch.float32, device=self.device)
                          if self.device.type == "cuda" else None)

    def _graph(self, fn: Callable[[], Any] | None) -> float:
        """Seconds per launch of ``fn`` (None: the flush alone) in a CUDA graph of ``reps`` launches."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):  # warm-up outside the graph (allocations, Triton compilation)
            for _ in range(3):
                self.flush_buf.fill_(1.0)
                if fn is not None:
                    fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(self.reps):
                self.flush_buf.fill_(1.0)
                if fn is not None:
                    fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize(self.device)
            times.append(start.elapsed_time(end) / 1e3 / self.reps)
        return statistics.median(times)

    def time(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            if not hasattr(self, "_flush_only"):
                self._flush_only = self._graph(None)
            return max(self._graph(fn) - self._flush_only, 1e-9)
        for _ in range(2):
            fn()
        times = []
        for _ in range(self.reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)


def ceilings(device: torch.device, timer: Timer, quick: bool) -> dict[str, Any]:
    n = (2**30 if device.type == "cuda" else (16 if quick else 256) * 2**20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timer.time(lambda: dst.copy_(src))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = 8192 if device.type == "cuda" else (256 if quick else 1024)
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    tm = timer.time(lambda: a @ b)
    return {"copy_gbs": 2 * n * 4 / t / 1e9, "matmul_tflops": 2 * m**3 / tm / 1e12,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def cases(device: torch.device, quick: bool, ms: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """Shapes and ops (built lazily so a failing case does not stop the run); ``ms`` overrides the batch rows."""
    if device.type == "cuda":
        layers = [(4096, 4096), (4096, 14336), (14336, 4096)]
        ms = ms or (1, 4, 16, 64, 256, 1024)
    else:
        layers = [(256, 384)] if quick else [(1024, 2048)]
        ms = ms or (1, 16)
    out = []
    for k, n in layers:
        for m in ms:
            for scheme in ("W3 g128", "W4 g128", "W8A8", "W4A8"):
                out.append({"scheme": scheme, "k": k, "n": n, "m": m})
    return out


def build(case: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], Callable[[], Any], int, torch.Tensor,
                                                                torch.Tensor]:
    """(op, bf16 baseline, weight bytes the op reads, op output, baseline output) for one case."""
    from overdrive.kernels import act8_linear, group_linear_kn, pack, prepare_group_weight

    k, n, m = case["k"], case["n"], case["m"]
    g = torch.Generator().manual_seed(k * 7 + n)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w16 = (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
    if case["scheme"].startswith("W3") or case["scheme"] == "W4 g128":
        bits = int(case["scheme"][1])
        codes = torch.randint(0, 1 << bits, (n, k), generator=g)
        scales = (torch.rand(n, k // 128, generator=g) / 100).to(dtype)
        zeros = torch.randint(0, 1 << bits, (n, k // 128), generator=g).to(torch.uint8)
        p = {name: t.to(device) for name, t in prepare_group_weight(pack(codes, bits), scales, zeros, bits, 128).items()}
        op = lambda: group_linear_kn(x, p["qweight_kn"], p["scales_kn"], p["szeros_kn"], bits, 128)  # noqa: E731
        nbytes = sum(t.numel() * t.element_size() for t in p.values())
    else:
        wbits = 8 if case["scheme"] == "W8A8" else 4
        q = (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8) if wbits == 8 else
             pack(torch.randint(0, 16, (n, k), generator=g), 4)).to(device)
        ws = (torch.rand(n, generator=g) / 50).to(device)
        op = lambda: act8_linear(x, q, ws, wbits)  # noqa: E731
        nbytes = q.numel() * q.element_size() + ws.numel() * 4
    base = lambda: torch.nn.functional.linear(x, w16)  # noqa: E731
    return op, base, nbytes, op(), base()


def run(device: torch.device, quick: bool, reps: int, ms: tuple[int, ...] | None = None,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """The whole table as a report; ``ms`` (e.g. (1, 16, 256)) overrides the batch rows; ``on_row`` is called
    with the rows so far after each case (a caller that may be cut off keeps what was measured)."""
    from overdrive.kernels.dispatch import active_backend

    timer = Timer(device, reps, 2 * _l2_bytes(device))
    ceil = ceilings(device, timer, quick)
    rows = []
    for case in cases(device, quick, ms):
        try:
            op, base, nbytes, _, _ = build(case, device)
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            t_op, t_base, t_copy = timer.time(op), timer.time(base), timer.time(lambda: dst.copy_(src))
            m, k, n = case["m"], case["k"], case["n"]
            rows.append({**case, "seconds": t_op, "bf16_seconds": t_base, "weight_copy_seconds": t_copy,
                         "speedup_vs_bf16": t_base / t_op, "of_copy_floor": t_copy / t_op,
                         "weight_bytes": nbytes, "op_gbs": nbytes / t_op / 1e9, "tflops": 2 * m * n * k / t_op / 1e12})
            print(f"{case['scheme']:8s} M={m:<5d} K={k:<6d} N={n:<6d} {t_op * 1e6:9.1f} us  vs bf16 "
                  f"{t_base / t_op:5.2f}x  copy floor {t_copy / t_op:5.2f}", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            rows.append({**case, "error": f"{type(e).__name__}: {e}"})
            print(f"{case['scheme']} M={case['m']} K={case['k']} N={case['n']}: {type(e).__name__}: {e}", flush=True)
        if on_row is not None:
            on_row(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from overdrive.benchmarks import header

    return header(
        "gemv", device, backend=active_backend(device),
        timing=("CUDA graph of reps launches, L2 flushed before each (2x L2 write), flush-only graph subtracted"
                   if device.type == "cuda" else "perf_counter median (CPU smoke run: torch references)"),
        reps=reps, ceilings=ceil, goals=GOALS,
        vllm_kernels=("not timed: vLLM is importable but its kernels are not wired into this script"
                         if importlib.util.find_spec("vllm") else "vLLM not importable on this machine"),
        results=rows,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.kernels_gemv", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny CPU sizes, few repeats (a smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="launches per CUDA graph / CPU repeats")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (3 if args.quick else (50 if device.type == "cuda" else 10))
    r = run(device, args.quick, reps)
    c = r["ceilings"]
    print(f"{r['device']}  {r['date']}  copy {c['copy_gbs']:.0f} GB/s  {c['matmul_dtype']} matmul "
          f"{c['matmul_tflops']:.1f} TFLOP/s")
    if args.json:
        from overdrive.benchmarks import write_json

        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

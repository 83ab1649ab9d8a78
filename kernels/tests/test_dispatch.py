from __future__ import annotations

from pathlib import Path

import pytest
import torch

from overdrive import kernels
from overdrive.kernels import dispatch
from overdrive.testing.probe import run_probe


@pytest.mark.parametrize("value,cpu", [("auto", "torch"), ("", "torch"), ("torch", "torch"),
                                       ("interpret", "triton-interpreter"), ("INTERPRET", "triton-interpreter")])
def test_backend_selection_on_cpu(monkeypatch, value, cpu):
    monkeypatch.setenv("OVERDRIVE_KERNELS", value)
    assert dispatch.backend_for("cpu") == cpu


def test_cuda_tensors_pick_triton_in_auto(monkeypatch):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "auto")
    assert dispatch.backend_for("cuda") == "triton"  # triton is installed in the test environment
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.backend_for("cuda") == "torch"


def test_bad_mode_and_impossible_requests_are_explained(monkeypatch):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "fast")
    with pytest.raises(ValueError, match="OVERDRIVE_KERNELS='fast' is not valid; use one of: auto, torch, triton, interpret"):
        kernels.int8_weight_linear(torch.zeros(1, 4), torch.zeros(2, 4, dtype=torch.int8), torch.ones(2))
    assert "unavailable" in kernels.active_backend("cpu")
    monkeypatch.setenv("OVERDRIVE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*OVERDRIVE_KERNELS=interpret"):
        dispatch.backend_for("cpu")
    monkeypatch.setenv("OVERDRIVE_KERNELS", "interpret")
    with pytest.raises(RuntimeError, match="on CPU tensors"):
        dispatch.backend_for("cuda")


def test_ops_are_listed():
    assert {"int8_weight_linear", "unpack"} <= set(kernels.list_ops())
    with pytest.raises(KeyError, match="unknown kernel op 'nope'; known: "):
        kernels.get_op("nope")


def test_importing_kernels_imports_no_triton_and_no_cuda():
    run = run_probe(Path(__file__).parent / "probes" / "lean_kernels_import.py", timeout=120)
    assert run.result == {"triton": False, "cuda": False}

from __future__ import annotations

import pytest
import torch

from overdrive.kernels.dispatch import load_triton_module


@pytest.fixture
def interpret(monkeypatch):
    """Run overdrive's Triton kernels in Triton's interpreter on CPU for this test."""
    monkeypatch.setenv("OVERDRIVE_KERNELS", "interpret")
    return lambda name: load_triton_module(name, interpret=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

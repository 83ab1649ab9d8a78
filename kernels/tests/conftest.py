from __future__ import annotations

import pytest
import torch

from overdrive.kernels.dispatch import load_triton_module


@pytest.fixture
def interpret(monkeypatch):
    """Run overdrive's Triton kernels in Triton's interpreter on CPU for this test."""
    import os
    import sys

    if torch.cuda.is_available() or ("triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("a CUDA machine (Triton compiled, not interpreted): the gpu-marked tests cover the "
                    "kernels there")
    monkeypatch.setenv("OVERDRIVE_KERNELS", "interpret")
    return lambda name: load_triton_module(name, interpret=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

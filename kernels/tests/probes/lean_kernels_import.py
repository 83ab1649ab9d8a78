"""Importing overdrive.kernels and asking for the backend imports no Triton and initialises no CUDA."""
import sys

import torch

import overdrive.kernels as k
from overdrive.testing.probe import emit

k.active_backend()
emit({"triton": "triton" in sys.modules, "cuda": torch.cuda.is_initialized()})

"""Test-session setup shared by every test folder.

Triton's interpreter must be chosen before Triton is first imported (it decorates its own standard
library at import), and libraries imported by tests (diffusers, vLLM) may import Triton. On machines
without CUDA the whole test process therefore runs Triton interpreted, so the kernel tests exercise
the real kernel code on CPU. Engine subprocesses started by tests do not inherit it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

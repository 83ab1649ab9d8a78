"""Importing overdrive and every adapter module imports no engine and initialises no CUDA.

These modules are imported in every vLLM/SGLang process through entry points: an eager engine
import or a CUDA context there would slow down or break every engine start.
"""
from __future__ import annotations

import json
import subprocess
import sys

ENGINES = ("vllm", "sglang", "diffusers", "transformers", "triton")

PROBE = """
import json, sys
import overdrive, overdrive.cli, overdrive.contracts, overdrive.adapters
import overdrive.adapters.vllm, overdrive.adapters.sglang, overdrive.adapters.diffusers, overdrive.adapters.transformers
import overdrive.adapters._register
overdrive.list_methods()
import torch
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split('.')[0] in %r),
                  "cuda_initialized": torch.cuda.is_initialized()}))
""" % (ENGINES,)


def test_import_overdrive_and_adapters_is_lean():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["modules"] == [], f"engine modules imported eagerly: {r['modules']}"
    assert r["cuda_initialized"] is False

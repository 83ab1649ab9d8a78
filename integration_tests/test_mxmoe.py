"""MxMoE in vLLM: until overdrive's vLLM adapter has a fused-MoE method for per-expert formats, an MxMoE
checkpoint must be refused at startup with the reason (never served by vLLM's unquantized MoE method on
weights it did not load)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_vllm_refuses_per_expert_formats_at_startup(tmp_path):
    from overdrive.mxmoe.quantize import write_plan
    from overdrive.mxmoe.tests.test_mxmoe import _plan
    from overdrive.testing.moe import tiny_moe

    src = tiny_moe("mixtral")
    out = tmp_path / "mx"
    write_plan(src, out, _plan(src))
    spec = {"model": str(out), "prompts": [[3, 17, 42]], "max_tokens": 2}
    r = subprocess.run([sys.executable, "-m", "overdrive.testing.vllm_generate", json.dumps(spec)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "quantizes MoE experts per expert, which overdrive's vLLM adapter does not serve yet" in r.stderr + r.stdout

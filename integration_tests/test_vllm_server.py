"""A real vLLM OpenAI server on the tiny LLM, with overdrive's plugin running inside its processes.

The example third-party plugin (examples/third_party_plugin) provides ``example_w8``; the chain under
test is: its ``overdrive.plugins`` entry point -> overdrive's registry -> overdrive's
``vllm.general_plugins`` entry point -> ``register_quantization_config`` in every vLLM process ->
vLLM detects the checkpoint's ``quant_method`` and runs overdrive's linear method.
Reference: transformers on a float32 checkpoint holding the dequantized weights (qweight * scale).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from overdrive.testing import tiny_llama
from overdrive.testing.vllm_server import VllmServer

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "hello world"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, plugin_env) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "llama-w8"
    r = subprocess.run([sys.executable, "-m", "overdrive.cli", "quantize", "--method", "example_w8",
                        "--model", str(tiny_llama()), "--output", str(out)],
                       env={**os.environ, **plugin_env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def dequantized(quantized, tmp_path_factory) -> Path:
    """Independent reference checkpoint: plain float32 weights W = qweight * scale."""
    out = tmp_path_factory.mktemp("ref") / "llama-deq"
    out.mkdir()
    tensors = load_file(quantized / "model.safetensors")
    ref = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            ref[f"{prefix}.weight"] = (t.double() * tensors[f"{prefix}.scale"].double()[:, None]).float()
        elif not name.endswith(".scale"):
            ref[name] = t
    save_file(ref, str(out / "model.safetensors"))
    for f in quantized.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    conf = json.loads((out / "config.json").read_text())
    conf.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(conf))
    return out


def transformers_greedy(model_dir: Path, prompt: str) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
    return out[0, ids.shape[1]:].tolist()


def test_quantized_checkpoint_format(quantized):
    conf = json.loads((quantized / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "example_w8"
    t = load_file(quantized / "model.safetensors")
    q, s = t["model.layers.0.self_attn.q_proj.qweight"], t["model.layers.0.self_attn.q_proj.scale"]
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and "model.layers.0.self_attn.q_proj.weight" not in t
    w = load_file(tiny_llama() / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].double()
    # closed form RTN in float64: scale = max|row| / 127, q = round(w / scale)
    scale = w.abs().amax(1) / 127
    assert torch.allclose(s.double(), scale, rtol=1e-6)
    assert torch.equal(q.long(), torch.round(w / scale[:, None]).long())


def test_vllm_serves_overdrive_method_inside_engine_processes(quantized, dequantized, plugin_env, tmp_path):
    trace = tmp_path / "trace.jsonl"
    env = {**plugin_env, "OVERDRIVE_TRACE": str(trace)}
    with VllmServer(quantized, ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                    env=env, log_path=tmp_path / "vllm.log") as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
        server_pid = srv.proc.pid
        log = srv.log_text()
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    vllm_lines = [x for x in lines if x["framework"] == "vllm"]
    # registered in the API server process and in at least one other (engine core / worker) process
    assert any(x["pid"] == server_pid for x in vllm_lines), lines
    assert any(x["pid"] != server_pid for x in vllm_lines), lines
    assert all("example_w8" in x["registered"] for x in vllm_lines), lines
    # vLLM picked the method from config.json (no --quantization flag given)
    assert "example_w8" in log
    want = [transformers_greedy(dequantized, p) for p in PROMPTS]
    assert got == want


def test_tensor_parallel_2_gives_the_same_tokens(quantized, dequantized, plugin_env, tmp_path):
    """Column-parallel shards of qweight/scale (merged qkv, gate/up) and row-parallel shards of qweight
    (o_proj, down_proj) load through vLLM's own weight loaders from the ParamSpec dims."""
    with VllmServer(quantized, ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                    env=plugin_env, log_path=tmp_path / "vllm-tp2.log", tp=2) as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
    assert got == [transformers_greedy(dequantized, p) for p in PROMPTS]

"""MoA end to end on the tiny Llama (CPU): ``overdrive calibrate --method moa`` writes a plan, transformers
generates with it, and a real vLLM server (float32) answers the same tokens, at tensor-parallel size 1 with
staggered batched requests and at TP 2; vLLM's KV capacity is the dense one (per-head spans do not shrink
its per-layer pages: docs/methods/moa.md); plans that do not fit the model fail when vLLM builds the layers.

One server per tensor-parallel size, shared by the module's tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from overdrive.moa import MoAPlan
from overdrive.testing import tiny_llama
from overdrive.testing.probe import child_env, run_probe
from overdrive.testing.vllm_server import VllmServer, kv_cache_tokens

pytestmark = pytest.mark.slow

MAX_TOKENS = 40
SERVE = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--block-size", "32"]
PROBES = Path(__file__).parent / "probes"


def _text() -> str:
    try:
        from overdrive.testing.real import opticks_split

        return opticks_split()[0]
    except (FileNotFoundError, ValueError):
        from overdrive.moa.calibrate import BUILTIN_TEXT

        return BUILTIN_TEXT * 40


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    text = _text()
    return ["the quick brown fox", "hello world", text[5000:5200]]  # the last is ~130 tokens: a sparse prefill


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> Path:
    """The CLI's plan at density 0.5 (lengths 128/256, sink 4, min span 16: spans bite within these answers)."""
    d = tmp_path_factory.mktemp("moa")
    data = d / "calib.txt"
    data.write_text(_text()[:200_000])
    out = d / "plan.json"
    r = subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "moa", "--model", str(tiny_llama()),
                        "--output", str(out), "--density", "0.5", "--lengths", "128,256", "--validate-length", "192",
                        "--max-len", "256", "--sink", "4", "--min-span", "16", "--samples", "2", "--response-tokens", "16",
                        "--data", str(data)], capture_output=True, text=True, timeout=600,
                       env=child_env({"OVERDRIVE_PROGRESS": "0"}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and "validation loss at 192 tokens" in r.stdout
    plan = MoAPlan.load(out)
    assert all(plan.density_at(n) <= 0.5 for n in (128, 256))
    return out


def _transformers_tokens(prompts: list[str], plan_path: Path | None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import overdrive.transformers as ot

    d = tiny_llama()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        kw = {"past_key_values": ot.kv_cache(model, "moa", plan=str(plan_path))} if plan_path else {}
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, **kw)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def served(plan_path, prompts, tmp_path_factory) -> dict:
    args = SERVE + ["--additional-config", json.dumps({"moa": {"plan": str(plan_path)}})]
    with VllmServer(tiny_llama(), args, log_path=tmp_path_factory.mktemp("tp1") / "vllm.log") as srv:
        single = [srv.greedy_token_ids(p, MAX_TOKENS) for p in prompts]
        batched = srv.staggered_greedy_token_ids(prompts * 2, MAX_TOKENS)
        log = srv.log_text()
    return {"single": single, "batched": batched, "log": log}


def test_vllm_tokens_equal_transformers_with_the_calibrated_plan(served, plan_path, prompts):
    want = _transformers_tokens(prompts, plan_path)
    assert served["single"] == want
    # requests joining while others decode (steps mixing prefill and decode rows): each equals its batch-1 answer
    assert served["batched"] == want * 2
    assert want != _transformers_tokens(prompts, None)  # the spans changed the answers: the comparison is not vacuous


def test_vllm_kv_capacity_is_the_dense_one(served):
    """Per-head spans save reads, not vLLM's allocation: the KV capacity equals dense float32 pages
    (2 layers x 2 KV heads x (K + V) x 32 x 4 bytes per token in VLLM_CPU_KVCACHE_SPACE = 1 GiB)."""
    dense = 2 * 2 * 2 * 32 * 4
    assert kv_cache_tokens(served["log"]) == 2**30 // dense // 32 * 32


def test_vllm_tensor_parallel_2_equals_transformers(plan_path, prompts, tmp_path):
    """TP=2: each rank holds one KV head and that head's spans."""
    args = SERVE + ["--additional-config", json.dumps({"moa": {"plan": str(plan_path)}})]
    with VllmServer(tiny_llama(), args, tp=2, log_path=tmp_path / "vllm.log") as srv:
        got = srv.staggered_greedy_token_ids(prompts, MAX_TOKENS)
    assert got == _transformers_tokens(prompts, plan_path)


def test_plan_for_another_model_fails_when_vllm_builds_the_layers(tmp_path):
    from overdrive.contracts.kv_cache import ModelIdentity
    from overdrive.moa import uniform_plan

    other = tmp_path / "other.json"
    uniform_plan(ModelIdentity("LlamaForCausalLM", 2, 4, 1, 32), 16.0, 0.5, sink=4, min_span=16).save(other)
    res = run_probe(PROBES / "moa_vllm_layer.py", str(tiny_llama()),
                    env=child_env({"OVERDRIVE_MOA_PLAN": str(other)}, engine=True)).result
    assert "was made for another model" in res["error"] and "num_kv_heads: plan 1 vs model 2" in res["error"]
    assert "OVERDRIVE_MOA_PLAN" in res["error"]  # names where the plan came from

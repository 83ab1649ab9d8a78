"""PM-KVQ in a real vLLM server (CPU): answers equal transformers with the same plan, the KV capacity vLLM
reports grows by the plan's compression factor, and bad plans / block sizes fail at startup.

Three engine starts in all: the plan, the baseline (no plan: vLLM's own CPU attention, through
overdrive's CPU_ATTN override), and a plan made for another model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.kernels.kv_attention import cell_words
from overdrive.pmkvq.config import PMKVQPlan, make_plan
from overdrive.testing import tiny_llama
from overdrive.testing.probe import child_env, run_probe
from overdrive.testing.vllm_server import VllmServer, kv_cache_tokens

pytestmark = pytest.mark.slow

PROBES = Path(__file__).parent / "probes"

PROMPTS = ["the quick brown fox", "hello world"]
MAX_TOKENS = 40  # with a 16-token window, most of each answer is read back from 4/2-bit pages
SERVE = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--block-size", "32"]
KV_GIB = 1  # VllmServer's default VLLM_CPU_KVCACHE_SPACE


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> Path:
    """A calibrated plan with mixed widths (the budget fits one 4-bit and one 2-bit layer)."""
    out = tmp_path_factory.mktemp("pmkvq") / "plan.json"
    r = subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "pmkvq", "--model",
                        str(tiny_llama()), "--output", str(out), "--budget", "55000B", "--max-len", "256",
                        "--window", "16", "--samples", "2", "--seq-len", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(PMKVQPlan.load(out).layer_bits) == [2, 4]
    return out


def _transformers_tokens(plan: PMKVQPlan | None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import overdrive.transformers as ot

    d = tiny_llama()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        kw = {"past_key_values": ot.kv_cache(model, "pmkvq", plan=plan, mode="static")} if plan is not None else {}
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, **kw)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def baseline_tokens(tmp_path_factory) -> int:
    with VllmServer(tiny_llama(), SERVE, log_path=tmp_path_factory.mktemp("base") / "vllm.log") as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
        log = srv.log_text()
    assert got == _transformers_tokens(None)  # without a plan the override is vLLM's own CPU attention
    return kv_cache_tokens(log)


def test_vllm_serves_the_plan_like_transformers_with_larger_kv_capacity(plan_path, baseline_tokens, tmp_path):
    plan = PMKVQPlan.load(plan_path)
    args = SERVE + ["--additional-config", json.dumps({"pmkvq": {"plan": str(plan_path)}})]
    with VllmServer(tiny_llama(), args, log_path=tmp_path / "vllm.log") as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
        # batching: requests joining while another decodes (steps mixing prefill and decode rows), each answer
        # equal to its own batch-1 transformers generation
        batched = srv.staggered_greedy_token_ids(PROMPTS * 2, MAX_TOKENS)
        log = srv.log_text()
    want = _transformers_tokens(plan)
    assert got == want
    assert batched == want * 2
    assert want != _transformers_tokens(None)  # the comparison exercised the quantized pages
    # capacity: bytes per token per layer from the formats' closed forms (float32 K/V vs PM-KVQ cells)
    ident = plan.identity
    dense = ident.num_layers * ident.num_kv_heads * 2 * ident.head_size * 4
    packed = sum(ident.num_kv_heads * 4 * cell_words(ident.head_size, b, 32) for b in plan.layer_bits)
    space, bs = KV_GIB * 2**30, 32
    assert baseline_tokens == space // dense // bs * bs
    tokens = kv_cache_tokens(log)
    assert tokens == space // packed // bs * bs
    assert tokens / baseline_tokens == pytest.approx(dense / packed, rel=1e-4)  # 6.4x for bits [4, 2]



def test_vllm_tensor_parallel_2_serves_the_plan_like_transformers(plan_path, tmp_path):
    """TP=2: each rank stores its own KV head, with its own slice of the key scales (distinct per head and strong,
    so a wrong slice changes what 2/4-bit pages hold); float32, so the all-reduce order cannot flip greedy tokens."""
    base = PMKVQPlan.load(plan_path)
    ident = base.identity
    assert ident.num_kv_heads == 2
    g = torch.Generator().manual_seed(0)
    half = torch.exp(1.5 * torch.randn(ident.num_layers, ident.num_kv_heads, ident.head_size // 2, generator=g))
    scales = torch.cat([half, half], dim=-1)  # both channels of a rotary pair share a scale
    plan = make_plan(ident, base.layer_bits, base.max_len, group_size=base.group_size, sink=base.sink,
                     window=base.window, fp_bytes=base.fp_bytes, key_scales=scales.tolist())
    path = tmp_path / "plan-tp.json"
    plan.save(path)
    args = SERVE + ["--additional-config", json.dumps({"pmkvq": {"plan": str(path)}})]
    with VllmServer(tiny_llama(), args, tp=2, log_path=tmp_path / "vllm.log") as srv:
        got = srv.staggered_greedy_token_ids(PROMPTS, MAX_TOKENS)
    assert got == _transformers_tokens(PMKVQPlan.load(path))


def test_plan_for_another_model_fails_at_startup(tmp_path):
    other = make_plan(ModelIdentity("LlamaForCausalLM", 2, 4, 1, 32), [4, 4], 256)
    path = tmp_path / "other.json"
    other.save(path)
    srv = VllmServer(tiny_llama(), SERVE, env={"OVERDRIVE_PMKVQ_PLAN": str(path)}, log_path=tmp_path / "vllm.log",
                     startup_timeout=300)
    with pytest.raises(RuntimeError, match="exited"):
        srv.__enter__()
    log = srv.log_text()
    assert "was made for another model" in log and "num_kv_heads: plan 1 vs model 2" in log


def _head80_model(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture's files with head_dim 80 (not a multiple of 32) and a hand-written plan for that geometry
    (``overdrive calibrate`` refuses such a head size, so only a hand-made plan can get this far)."""
    src = tiny_llama()
    model = tmp_path / "head80"
    model.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["head_dim"] = 80
    (model / "config.json").write_text(json.dumps(cfg))
    plan = PMKVQPlan(model={"architecture": "LlamaForCausalLM", "num_layers": 2, "num_attention_heads": 4,
                            "num_kv_heads": 2, "head_size": 80},
                     layers=[{"bits": 4, "budget_bytes": 10**6}] * 2, max_len=256)
    path = tmp_path / "head80.json"
    plan.save(path)
    return model, path


def test_block_size_or_head_size_the_kernel_cannot_take_is_a_startup_error(plan_path, tmp_path):
    """The impl vLLM builds per attention layer while constructing the model (before any request)
    rejects a block size and a head size the kernels cannot take, naming the value."""
    m80, p80 = _head80_model(tmp_path)
    cases = [("block 24", str(tiny_llama()), 24, str(plan_path), 32), ("block 32", str(tiny_llama()), 32, str(plan_path), 32),
             ("head 80", str(m80), 32, str(p80), 80)]
    out = run_probe(PROBES / "vllm_kv_impl_check.py", "pmkvq", cases, env=child_env(engine=True)).result
    assert out["block 32"] == "ok"
    assert "--block-size 24 is not a multiple of 16" in out["block 24"]
    assert "needs a head size that is a multiple of 32, got 80" in out["head 80"]
    assert "OVERDRIVE_PMKVQ_PLAN" in out["head 80"]  # names where the plan came from


def test_backend_is_in_vllms_registry_by_name():
    out = run_probe(PROBES / "vllm_kv_registry.py", "pmkvq", "48", env=child_env(engine=True)).result
    assert out == {"name": "PMKVQ", "cli": "PMKVQ", "cpu": "overdrive.adapters.vllm.kv_backend.OverdriveCPUAttentionBackend",
                   "cell_parent": "PmkvqBackend", "blocks": ["MultipleOf(16)"], "heads": [32, 64, 96]}

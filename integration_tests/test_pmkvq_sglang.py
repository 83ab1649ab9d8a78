"""PM-KVQ in SGLang 0.5.23 on CPU: the backend is in SGLang's real attention registry and CLI choices, and its
forward (SGLang's torch-native attention over SGLang's real KV pools) follows the generic transformers cache's
semantics step by step (2-bit body, sink 1, window 8, per-channel key scales). SGLang's server needs CUDA, so no
server is started; the probe (``probes/sglang_kv.py``) is shared with every KV-cache method."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.pmkvq.config import make_plan
from overdrive.testing import tiny_llama
from overdrive.testing.probe import child_env, run_probe


@pytest.mark.slow  # imports SGLang in a fresh process
def test_sglang_registry_and_backend_semantics(tmp_path):
    ident = ModelIdentity("LlamaForCausalLM", 1, 4, 2, 32)  # the probe's geometry
    g = torch.Generator().manual_seed(0)
    half = torch.rand(2, 16, generator=g) + 0.5
    scale = torch.cat([half, half], -1)  # rotary pairs share a scale
    plan = tmp_path / "plan.json"
    make_plan(ident, [2], 256, window=8, fp_bytes=4, key_scales=[scale.tolist()]).save(plan)
    wrong = tmp_path / "wrong.json"
    make_plan(ModelIdentity("LlamaForCausalLM", 3, 4, 2, 32), [4, 4, 4], 64).save(wrong)
    env = child_env(engine=True)
    env.pop("OVERDRIVE_PMKVQ_PLAN", None)
    out = run_probe(Path(__file__).parent / "probes" / "sglang_kv.py", "pmkvq", str(plan), "--lens", "13,5",
                    "--steps", "14", "--wrong-plan", str(wrong), "--model", str(tiny_llama()), env=env).result
    assert out["registered"] and out["choices"] == 1 and out["cli"] == "pmkvq"
    assert "needs a plan: set OVERDRIVE_PMKVQ_PLAN=PLAN.json" in out["no_plan"]
    assert "was made for another model" in out["wrong_plan"] and "num_layers: plan 3 vs model 2" in out["wrong_plan"]
    assert out["lens"] == [26, 18] and out["body"] > 0  # the 2-bit body was used
    assert out["max_err"] < 1e-5, out

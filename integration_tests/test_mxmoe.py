"""MxMoE in vLLM: per-expert mixed formats served by overdrive's fused-MoE method give the tokens
transformers gives (which equal a float64 dequantized reference: plugins/mxmoe/tests); bad plans are
refused at startup with the reason. One engine start-up per family."""
from __future__ import annotations

import json
import shutil

import pytest

from overdrive.testing.probe import child_env, run_probe

PROMPTS = ["the quick brown fox", "a b c d e f", "numbers 1 2 3"]


def _checkpoint(family, tmp_path):
    from overdrive.mxmoe.quantize import write_plan
    from overdrive.mxmoe.tests.test_mxmoe import _plan
    from overdrive.testing.moe import tiny_moe

    src = tiny_moe(family)
    out = tmp_path / f"mx-{family}"
    write_plan(src, out, _plan(src))
    return out


def _vllm(model, timeout=600, check=True):
    spec = {"model": str(model), "prompts": PROMPTS, "max_tokens": 8}
    return run_probe("overdrive.testing.vllm_generate", spec, env=child_env(engine=True), timeout=timeout,
                     check=check)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_vllm_tokens_equal_transformers(family, tmp_path):
    from overdrive.testing.hf_generate import greedy_tokens

    ckpt = _checkpoint(family, tmp_path)
    hf = greedy_tokens(ckpt, PROMPTS, max_tokens=8)["tokens"]
    run = _vllm(ckpt)
    assert run.result["tokens"] == hf
    assert "experts in" in run.stdout + run.stderr and "format groups" in run.stdout + run.stderr


@pytest.mark.slow
def test_vllm_refuses_a_plan_over_its_budget_at_startup(tmp_path):
    ckpt = _checkpoint("mixtral", tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["quantization_config"]["avg_bits"] = 3.0
    (bad / "config.json").write_text(json.dumps(conf))
    run = _vllm(bad, timeout=300, check=False)
    assert run.returncode != 0
    assert "over the budget avg_bits=3.0" in run.stdout + run.stderr

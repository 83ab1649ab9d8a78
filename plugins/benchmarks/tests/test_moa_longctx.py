"""The long-context MoA benchmark on the tiny Llama: prompts hold what they claim, teacher-forced retrieval equals
greedy generation (dense and through the span cache), and the quick run's report (matched reads, dense perplexity
against a plain full-logits forward)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from overdrive.benchmarks import moa_longctx as bench
from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.moa.config import make_plan
from overdrive.testing import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_llama()
    return d, AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _plan(model, seed=0):
    ident = ModelIdentity.from_hf_config(model.config)
    g = torch.Generator().manual_seed(seed)
    alphas = [[float(x) for x in torch.randint(-32, 64, (ident.num_kv_heads,), generator=g)] for _ in range(ident.num_layers)]
    betas = [[float(x) for x in torch.rand(ident.num_kv_heads, generator=g)] for _ in range(ident.num_layers)]
    return make_plan(ident, alphas, betas, sink=4, min_span=16, density=0.5)


@pytest.mark.parametrize("task", bench.TASKS)
def test_prompts_have_the_length_the_needle_and_the_answer_last(tiny, task):
    _, tok, _ = tiny
    for depth in (0.1, 0.9):
        ids, ans = bench.retrieval_prompt(tok, task, 300, depth, seed=3)
        assert len(ids) == 300 and ids[-len(ans):] == ans
        text = tok.decode(ids)
        key = tok.decode(ans).strip()
        assert len(key) == 5 and key.isdigit()
        needle = text.index(f"is {key}.")
        assert abs(needle / len(text) - depth) < 0.2  # the asked needle sits near its depth
        if task == "multikey":
            assert sum(text.count(f"of the {d} door is") for d in bench.DOORS) == len(bench.DOORS) + 1  # + the question
    with pytest.raises(ValueError, match="cannot hold"):
        bench.retrieval_prompt(tok, task, 20, 0.5, seed=0)


def test_teacher_forced_retrieval_is_greedy_generation(tiny):
    import overdrive.transformers as ot

    _, tok, model = tiny
    plan = _plan(model)
    prompt = torch.tensor([bench.retrieval_prompt(tok, "passkey", 120, 0.3, seed=1)[0][:-6]])
    for p in (None, plan):
        kw = {} if p is None else {"past_key_values": ot.kv_cache(model, "moa", plan=p)}
        if p is None:
            model.set_attn_implementation("sdpa")
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0, **kw)[0, prompt.shape[1]:].tolist()
        ids = prompt[0].tolist() + gen
        assert bench.retrieved(model, ids, gen, p)
        wrong = gen[:-1] + [(gen[-1] + 1) % model.config.vocab_size]
        assert not bench.retrieved(model, prompt[0].tolist() + wrong, wrong, p)


def test_quick_run_report(tiny, tmp_path):
    d, tok, model = tiny
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    _plan(model).save(plan_dir / "moa-d0.5.json")
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--plan-dir", str(plan_dir), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] and r["date"] and set(r["rows"]) == {"0.5"}
    assert r["complete"] and r["missing"] == []
    from overdrive.testing.real import opticks_split

    stream = tok(opticks_split()[1][:20000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    for n in (160, 256):
        cell = r["rows"]["0.5"][str(n)]
        reads = cell["reads"]
        assert abs(reads["streamingllm"] - reads["moa"]) <= 0.5 and reads["uniform-elastic"] == pytest.approx(
            reads["moa"], abs=1.0)  # the references read as many positions per query as the plan
        assert set(cell["retrieval"]) == set(bench.METHODS) and set(cell["perplexity"]) == set(bench.METHODS)
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            lg = model(input_ids=stream[None, :n]).logits[0, -17:-1].double()
        want = math.exp(float(torch.nn.functional.cross_entropy(lg, stream[n - 16:n])))
        assert cell["perplexity"]["dense"] == pytest.approx(want, rel=1e-6)
    assert "d0.5_retrieval_moa_over_streamingllm" in r["goals"]


def test_goals_only_from_finished_measurements():
    """A cut-short run: the goals are read per length off complete measurements only; ``missing`` decides."""
    def cell(moa_acc, sl_acc, ppl):
        ret = {m: {"all": a} for m, a in zip(bench.METHODS, (1.0, moa_acc, sl_acc, 0.5))}
        return {"retrieval": ret, "perplexity": dict(zip(bench.METHODS, ppl))}

    rows = {"0.5": {"1024": cell(0.75, 0.25, (10.0, 11.0, 12.0, 11.5)), "2048": cell(0.5, 0.5, (9.0, 9.9, 9.5, 9.6))},
            "0.3": {"1024": cell(0.5, 0.5, (10.0, 10.5, 12.0, 11.0))}}
    report = {"rows": rows, "lengths": [1024, 2048], "missing": ["N=2048 multikey depth 0.75"]}
    g = bench.goals(report)
    ret = g["d0.5_retrieval_moa_over_streamingllm"]
    assert ret["length"] == 1024 and set(ret["by_length"]) == {"1024"}  # 2048's retrieval is unfinished
    assert ret["ratio"] == pytest.approx(3.0) and ret["met"]
    ppl = g["d0.5_perplexity_moa_vs_uniform_elastic"]
    assert ppl["length"] == 2048 and not ppl["met"] and ppl["by_length"]["1024"]["met"]  # 9.9 > 9.6; 11 <= 11.5
    gap = g["d0.3_gap_to_dense"]
    assert gap["length"] == 1024 and gap["moa"] == pytest.approx(0.5) and gap["streamingllm"] == pytest.approx(2.0)
    assert gap["met"]  # 0.5 <= 2.0 / 2
    report["missing"] += ["N=1024 perplexity chunk 0"]
    assert "d0.3_gap_to_dense" not in bench.goals(report)

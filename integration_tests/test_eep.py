"""EEP on real transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) and stock vLLM.

* the module swap equals an independent float64 re-implementation of the pruned MoE block;
* a discrete plan's export is a standard checkpoint: transformers on it == the in-memory swapped model;
* stock vLLM (no overdrive plugin) serves the export with transformers' greedy tokens;
* the CLI searches and exports; bad input fails with one line and writes nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from overdrive.adapters.transformers.expert_pruning import apply_maps, moe_blocks, moe_identity, restore
from overdrive.config import ConfigError
from overdrive.contracts.expert_pruning import LayerMaps
from overdrive.eep.config import EEPConfig, EEPPlan
from overdrive.eep.export import export_checkpoint
from overdrive.eep.search import selection_matrix
from overdrive.testing.moe import tiny_moe

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _load(path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


def _reference_block(block, x, maps, renorm):
    """The pruned MoE block token by token in float64, from the original weights (no overdrive code)."""
    h = x.reshape(-1, x.shape[-1]).double()
    gate_w = block.gate.weight.double()
    gu = block.experts.gate_up_proj.double()
    down = block.experts.down_proj.double()
    c, t = maps.merge.double(), maps.route.double()
    out = torch.zeros_like(h)
    for n in range(h.shape[0]):
        p = torch.softmax(h[n] @ gate_w.T, dim=-1)
        s = t @ p
        top = torch.topk(s, maps.top_k)
        w = top.values / top.values.sum() if renorm else top.values
        for wb, b in zip(w, top.indices):
            g_u = sum(c[b, e] * gu[e] for e in range(gu.shape[0]))
            d = sum(c[b, e] * down[e] for e in range(gu.shape[0]))
            gate, up = (g_u @ h[n]).chunk(2)
            out[n] += wb * (d @ (block.experts.act_fn(gate) * up))
    if hasattr(block, "shared_expert"):
        sh = block.shared_expert(h)
        out += torch.sigmoid(block.shared_expert_gate(h)) * sh
    return out.reshape(x.shape)


def _random_maps(ident, seed, discrete=False, keep=5, k=2):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in ident.moe_layers:
        if discrete:
            kept = sorted(torch.randperm(ident.num_experts, generator=g)[:keep].tolist())
            route = selection_matrix(kept, ident.num_experts)
            merge = route + 0.1 * torch.rand(keep, ident.num_experts, generator=g, dtype=torch.float64)
        else:
            route = torch.rand(keep, ident.num_experts, generator=g, dtype=torch.float64)
            merge = torch.rand(keep, ident.num_experts, generator=g, dtype=torch.float64) / 2
        out[l] = LayerMaps(merge, route, k)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_swap_equals_a_float64_reference_of_the_pruned_block(family):
    model = _load(tiny_moe(family))
    ident = moe_identity(model)
    maps = _random_maps(ident, 0)
    blocks = moe_blocks(model)
    captured = {}

    def grab(layer):
        def fn(mod, args, kwargs, out):
            captured[layer] = ((args[0] if args else kwargs["hidden_states"]).detach(), out.detach())
        return fn

    apply_maps(model, maps)
    hs = [blocks[l].register_forward_hook(grab(l), with_kwargs=True) for l in blocks]
    ids = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(3))
    model(ids)
    for h in hs:
        h.remove()
    restore(model)  # the reference reads the original weights
    for l, (x, out) in captured.items():
        ref = _reference_block(blocks[l], x, maps[l], ident.renormalize)
        assert torch.allclose(out, ref, atol=1e-10), (family, l, float((out - ref).abs().max()))


def test_enable_through_the_facade_applies_a_saved_plan_and_disable_restores(tmp_path):
    import overdrive.transformers as odt

    model = _load(tiny_moe("qwen3_moe"))
    ident = moe_identity(model)
    maps = _random_maps(ident, 7, discrete=True)
    path = EEPPlan(ident, maps, EEPConfig(experts=5)).save(tmp_path / "p.json")
    ids = torch.randint(0, 400, (1, 9))
    ref = model(ids).logits
    odt.enable(model, "eep", plan=str(path))
    pruned = model(ids).logits
    assert not torch.allclose(pruned, ref, atol=1e-3)
    apply_maps(model, maps)  # the same maps applied directly give the same output
    assert torch.allclose(model(ids).logits, pruned, atol=1e-12)
    assert odt.disable(model)
    assert torch.equal(model(ids).logits, ref)
    other = _load(tiny_moe("mixtral"))
    with pytest.raises(ConfigError, match="another model"):
        odt.enable(other, "eep", plan=str(path))


def test_restore_is_exact_and_identity_maps_change_nothing():
    model = _load(tiny_moe("mixtral"))
    ids = torch.randint(0, 400, (1, 9))
    ref = model(ids).logits
    ident = moe_identity(model)
    eye = {l: LayerMaps(torch.eye(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64), 2) for l in ident.moe_layers}
    apply_maps(model, eye)
    # the original router takes its softmax in float32; the mapped one in the model's dtype
    assert torch.allclose(model(ids).logits, ref, atol=1e-4)
    restore(model)
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_discrete_export_is_the_swapped_model(family, tmp_path):
    src = tiny_moe(family)
    model = _load(src)
    ident = moe_identity(model)
    maps = _random_maps(ident, 1, discrete=True)
    plan = EEPPlan(ident, maps, EEPConfig(experts=5))
    assert plan.discrete
    out = export_checkpoint(src, plan, tmp_path / "pruned")
    conf = json.loads((out / "config.json").read_text())
    assert conf.get("num_local_experts", conf.get("num_experts")) == 5
    pruned = _load(out)
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(4))
    apply_maps(model, maps)
    assert torch.allclose(pruned(ids).logits, model(ids).logits, atol=1e-6)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in _load(src).parameters())


def test_exports_that_would_not_be_exact_are_refused(tmp_path):
    src = tiny_moe("qwen2_moe")  # norm_topk_prob=False: weights are not renormalised
    ident = moe_identity(_load(src))
    plan = EEPPlan(ident, _random_maps(ident, 2, discrete=True), EEPConfig(experts=5))
    with pytest.raises(ConfigError, match="does not renormalise"):
        export_checkpoint(src, plan, tmp_path / "a")
    mix = tiny_moe("mixtral")
    mident = moe_identity(_load(mix))
    cont = EEPPlan(mident, _random_maps(mident, 3), EEPConfig(experts=5))
    with pytest.raises(ConfigError, match="not one-hot"):
        export_checkpoint(mix, cont, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="made for another model|architecture"):
        export_checkpoint(src, EEPPlan(mident, _random_maps(mident, 1, discrete=True), EEPConfig(experts=5)),
                          tmp_path / "c")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "overdrive.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_search_then_export(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"question {i} about the fox", "answer": f"the answer is {i}"})
                              for i in range(8)) + "\n")
    model = tiny_moe("mixtral")
    plan = tmp_path / "plan.json"
    r = _cli("calibrate", "--method", "eep", "--model", model, "--task", task, "--experts", "4",
             "--population", "4", "--prune-generations", "2", "--merge-generations", "1", "--freeze-route",
             "--output", plan, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    p = EEPPlan.load(plan)
    assert p.num_kept == 4 and p.discrete and p.fitness["train"] >= min(p.fitness["train"], p.fitness["unpruned_train"])
    out = tmp_path / "ckpt"
    r = _cli("export", "--method", "eep", "--model", model, "--plan", plan, "--output", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    freq = tmp_path / "freq.json"
    assert _cli("calibrate", "--method", "eep", "--model", model, "--task", task, "--experts", "4", "--strategy",
                "frequency", "--output", freq, "--device", "cpu").returncode == 0
    assert EEPPlan.load(freq).options.strategy == "frequency"


@pytest.mark.slow
def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    model = tiny_moe("mixtral")
    for extra, msg in ((["--device", "cuda"] if not torch.cuda.is_available() else ["--experts", "0"], "CUDA"),
                       (["--device", "cpu", "--experts", "99"], "only 8 experts")):
        args = ["calibrate", "--method", "eep", "--model", model, "--task", task, "--output", tmp_path / "p.json"]
        if "--experts" not in extra:
            args += ["--experts", "4"]
        r = _cli(*args, *extra)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and msg in last and "Traceback" not in r.stderr, r.stderr
        assert last.startswith("overdrive calibrate: error: ")
        assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_stock_vllm_serves_the_export_with_transformers_tokens(tmp_path):
    from overdrive.testing.hf_generate import greedy_tokens
    from overdrive.testing.vllm_server import VllmServer

    src = tiny_moe("mixtral")
    model = _load(src, torch.float32)
    ident = moe_identity(model)
    maps = _random_maps(ident, 5, discrete=True, keep=4)
    out = export_checkpoint(src, EEPPlan(ident, maps, EEPConfig(experts=4)), tmp_path / "pruned")
    prompts = ["the quick brown fox", "hello world, this is"]
    ours = greedy_tokens(out, prompts, 8)["tokens"]
    # the in-memory pruned model gives the same tokens as the export
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src)
    apply_maps(model, maps)
    for p, want in zip(prompts, ours):
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        assert gen == want
    with VllmServer(out, ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                    env={"VLLM_PLUGINS": ""}, log_path=tmp_path / "vllm.log") as srv:
        got = [srv.greedy_token_ids(p, 8) for p in prompts]
    assert got == ours

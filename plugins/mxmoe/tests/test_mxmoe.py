"""MxMoE checkpoints in transformers against a float64 dequantized reference; plan validation."""
import copy
import json

import pytest
import torch
from safetensors import safe_open

from overdrive.config import ConfigError
from overdrive.kernels.packing import unpack_reference
from overdrive.mxmoe.config import LINEARS, MxMoEConfig, linear_shape, parse_format
from overdrive.testing.moe import tiny_moe

# weight-only formats mixed per expert and per linear (every group size divides 64 and 128)
CYCLE = ("w2g32", "w3g64", "w4g32", "w8g64", "w4g64", "w3g32")


def _identity(path):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    text = c
    e = getattr(c, "num_local_experts", None) or c.num_experts
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    return {"architecture": c.architectures[0], "num_layers": c.num_hidden_layers,
            "moe_layers": list(range(c.num_hidden_layers)), "num_experts": e, "top_k": c.num_experts_per_tok,
            "hidden_size": text.hidden_size, "expert_intermediate_size": inter,
            "renormalize": bool(getattr(c, "norm_topk_prob", True)),
            "shared_expert": c.architectures[0].startswith("Qwen2Moe")}


def _plan(path, avg_bits=8.5, cycle=CYCLE):
    ident = _identity(path)
    formats = {}
    n = 0
    for l in ident["moe_layers"]:
        formats[str(l)] = {}
        for e in range(ident["num_experts"]):
            formats[str(l)][str(e)] = {}
            for lin in LINEARS:
                formats[str(l)][str(e)][lin] = cycle[n % len(cycle)]
                n += 1
    return MxMoEConfig(avg_bits=avg_bits, quantizer="rtn", r=1.0, identity=ident, formats=formats)


@pytest.fixture(scope="module", params=["mixtral", pytest.param("qwen2_moe", marks=pytest.mark.slow),
                                        pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def checkpoint(request, tmp_path_factory):
    from overdrive.mxmoe.quantize import write_plan

    src = tiny_moe(request.param)
    out = tmp_path_factory.mktemp(f"mx-{request.param}") / "ckpt"
    cfg = _plan(src)
    write_plan(src, out, cfg)
    return request.param, src, out, cfg


def _reference_weights(out, cfg):
    """float64 (layer, expert, linear) -> weight, dequantized here from the raw safetensors."""
    tensors = {}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    ident = cfg.identity
    h, i = ident["hidden_size"], ident["expert_intermediate_size"]
    arch = ident["architecture"]
    block = "block_sparse_moe" if arch.startswith("Mixtral") else "mlp"
    proj = {"gate": "w1", "up": "w3", "down": "w2"} if arch.startswith("Mixtral") else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    w = {}
    for l in ident["moe_layers"]:
        for e in range(ident["num_experts"]):
            for lin in LINEARS:
                p = f"model.layers.{l}.{block}.experts.{e}.{proj[lin]}"
                fmt = parse_format(cfg.formats[str(l)][str(e)][lin])
                n, k = linear_shape(lin, h, i)
                codes = unpack_reference(tensors[p + ".qweight"], fmt.bits, k).double()
                g = fmt.group_size
                z = tensors[p + ".zeros"].double().repeat_interleave(g, 1)
                s = tensors[p + ".scales"].double().repeat_interleave(g, 1)
                w[(l, e, lin)] = (codes - z) * s
    return w


def test_transformers_tokens_equal_float64_reference(checkpoint):
    import overdrive.transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    family, src, out, cfg = checkpoint
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    groups = q.model.layers[0].mlp.experts.runtime.groups()
    assert len(groups) > 3  # experts really grouped by several formats
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64, experts_implementation="eager").eval()
    w = _reference_weights(out, cfg)
    i = cfg.identity["expert_intermediate_size"]
    with torch.no_grad():
        for l in cfg.identity["moe_layers"]:
            ex = ref.model.layers[l].mlp.experts
            for e in range(cfg.identity["num_experts"]):
                ex.gate_up_proj[e, :i] = w[(l, e, "gate")]
                ex.gate_up_proj[e, i:] = w[(l, e, "up")]
                ex.down_proj[e] = w[(l, e, "down")]
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64, experts_implementation="eager").eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 64]])
    a = q.generate(ids, max_new_tokens=12, do_sample=False)
    b = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert a.tolist() == b.tolist()
    # the logits agree closely, and the quantization is visible against the float model
    with torch.no_grad():
        lq = q(ids).logits.double()
        lr = ref(ids).logits
        lf = float_model(ids).logits
    assert (lq - lr).abs().max() < 1e-3 * lr.abs().max()
    assert (lf - lr).abs().max() > 10 * (lq - lr).abs().max()


def _load_with(out, tmp_path, edit):
    import shutil

    import overdrive.transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    conf = json.loads((bad / "config.json").read_text())
    edit(conf["quantization_config"])
    (bad / "config.json").write_text(json.dumps(conf))
    return AutoModelForCausalLM.from_pretrained(bad, dtype=torch.float32)


def test_bad_plans_rejected_at_load(checkpoint, tmp_path):
    family, src, out, cfg = checkpoint
    if family != "mixtral":
        pytest.skip("one family is enough for the config checks")

    def unknown(qc):
        qc["formats"]["0"]["1"]["up"] = "w5g48"

    with pytest.raises(ConfigError, match=r"layer 0 expert 1 up: unknown format 'w5g48'"):
        _load_with(out, tmp_path / "a", unknown)

    def over_budget(qc):
        qc["avg_bits"] = 3.0

    with pytest.raises(ConfigError, match=r"layer 0 uses .* bits per expert weight, over the budget avg_bits=3.0"):
        _load_with(out, tmp_path / "b", over_budget)

    def other_model(qc):
        qc["identity"]["hidden_size"] = 256

    with pytest.raises(ConfigError, match=r"made for another model .*hidden_size: plan 256, model 128"):
        _load_with(out, tmp_path / "c", other_model)


def test_plan_validation_messages():
    ident = {"architecture": "X", "num_layers": 1, "moe_layers": [0], "num_experts": 1, "top_k": 1,
             "hidden_size": 64, "expert_intermediate_size": 32, "renormalize": True, "shared_expert": False}
    ok = {"0": {"0": {"gate": "w4g32", "up": "w4g32", "down": "w4g32"}}}
    assert MxMoEConfig(avg_bits=4.75, identity=ident, formats=ok).layer_bits(0) == pytest.approx(4.75)
    with pytest.raises(ConfigError, match="over the budget"):
        MxMoEConfig(avg_bits=4.5, identity=ident, formats=ok)
    bad = copy.deepcopy(ok)
    bad["0"]["0"]["down"] = "w4g64"  # 32 input features: the group does not divide them
    with pytest.raises(ConfigError, match="divisible by 64"):
        MxMoEConfig(avg_bits=8, identity=ident, formats=bad)
    with pytest.raises(ConfigError, match="experts 0..0"):
        MxMoEConfig(avg_bits=8, identity=ident, formats={"0": {}})
    with pytest.raises(ConfigError, match="formats cover layers"):
        MxMoEConfig(avg_bits=8, identity=ident, formats={})


def test_export_writes_the_per_layer_uniform_rtn_weights(checkpoint, tmp_path):
    family, src, out, cfg = checkpoint
    if family != "mixtral":
        pytest.skip("one family is enough for the export layout")
    from overdrive.mxmoe.export import export, uniform_formats

    uni = uniform_formats(cfg)
    for l, name in uni.items():  # within what the plan spends per layer, and no candidate closer to it
        assert parse_format(name).bits_per_weight(64) <= cfg.layer_bits(l) + 1e-9
    ct = export(src, out, tmp_path / "ct")
    conf = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "compressed-tensors"
    fmt = parse_format(uni[1])
    assert fmt.bits == 4 and conf["overdrive"]["per_layer_uniform"]["1"] == uni[1]
    assert "model.layers.0.self_attn.q_proj" in conf["ignore"]
    with safe_open(str(ct / "model.safetensors"), framework="pt") as f, \
            safe_open(str(src / "model.safetensors"), framework="pt") as g:
        p = "model.layers.1.block_sparse_moe.experts.5.w2"
        w = g.get_tensor(p + ".weight").double()
        n, k = w.shape
        # dense little-endian 4-bit stream per row: 8 codes per int32 word
        words = f.get_tensor(p + ".weight_packed").to(torch.int64) & 0xFFFFFFFF
        codes = torch.stack([(words >> (4 * j)) & 15 for j in range(8)], -1).reshape(n, -1)[:, :k].double()
        zw = f.get_tensor(p + ".weight_zero_point").to(torch.int64) & 0xFFFFFFFF
        zeros = torch.stack([(zw >> (4 * j)) & 15 for j in range(8)], 1).reshape(-1, zw.shape[1])[:n].double()
        s = f.get_tensor(p + ".weight_scale").double()
        deq = (codes - zeros.repeat_interleave(fmt.group_size, 1)) * s.repeat_interleave(fmt.group_size, 1)
    # round to nearest: every weight within half a step of its group's scale (closed form of RTN)
    step = s.repeat_interleave(fmt.group_size, 1)
    assert ((deq - w).abs() <= 0.5 * step * (1 + 1e-3) + 1e-7).all()

"""Rotation (QuaRot/SpinQuant style) through the LLM calibration layer preserves the float model; the
runtime applies the online part; options a model cannot take are refused before any work."""
from __future__ import annotations

import copy

import pytest
import torch

from overdrive import ConfigError, cli
from overdrive.contracts.llm_calibration import load_for_calibration
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.rotation import _check_rmsnorm, check_rotation, online_block, rotate
from overdrive.testing import tiny_llama, tiny_qwen2_vl


def _model(**overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(**overrides), dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in model.named_modules():  # the fixture's norms are all 1: give them weights to fold
            if name.endswith("norm"):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g, dtype=torch.float64) + 0.5)
    return model


@pytest.mark.parametrize("mode,overrides", [
    ("residual", {}), ("full", {}),
    # 96 = 3 x 32: a composite random Hadamard; grouped KV heads; a tied head (untied by the rotation)
    ("full", {"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1,
              "tie_word_embeddings": True})])
def test_rotated_float_model_equals_the_original_in_float64(mode, overrides):
    model = _model(**overrides)
    original = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    emb_before = model.model.embed_tokens.weight.detach().clone()
    run = load_for_calibration(model, device="cpu")
    try:
        online, hooks = rotate(run, mode, seed=5)
        got = run.forward([{"input_ids": ids}])[0]
    finally:
        run.close()
    with torch.no_grad():
        ref = original(input_ids=ids).logits
    # transformers' RMSNorm computes in float32 even in a float64 model: relative 1e-6
    assert float((got - ref).abs().max()) < 1e-6 * float(ref.abs().max())
    # it did rotate: weightless norms, a changed embedding, and the online transform is needed
    assert (model.model.embed_tokens.weight - emb_before).abs().max() > 1e-3
    assert all(bool((m.weight == 1).all()) for n, m in model.named_modules() if n.endswith("norm"))
    assert online == (online_block(model.config.intermediate_size) if mode == "full" else 0)
    assert len(hooks) == (model.config.num_hidden_layers if mode == "full" else 0)
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert model.config.tie_word_embeddings is False
    if hooks:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            wrong = model(input_ids=ids).logits
        assert float((wrong - ref).abs().max()) > 1e-3 * float(ref.abs().max())


def test_online_block_and_the_options_a_model_cannot_take():
    assert online_block(1536) == 512 and online_block(256) == 256 and online_block(11008) == 256
    assert online_block(1 << 14) == 4096
    assert check_rotation("full", 1536) == 512 and check_rotation("residual", 1001) == 0
    with pytest.raises(ConfigError, match="no power-of-two factor >= 32"):
        check_rotation("full", 1000)
    with pytest.raises(ConfigError, match="--rotate must be one of"):
        check_rotation("quarot")
    with pytest.raises(ConfigError, match="vision-language model"):
        check_rotation("residual", 256, is_vlm=True)
    # a norm the rotation cannot pass through: LayerNorm subtracts the mean
    with pytest.raises(ConfigError, match="does not compute x / rms"):
        _check_rmsnorm("norm", torch.nn.LayerNorm(64, bias=False))


@pytest.mark.parametrize("args,match", [
    (["--rotate", "full", "--format", "compressed-tensors"], "--rotate full adds an online Hadamard"),
    (["--rotate", "residual", "--vlm"], "is a vision-language model"),
])
def test_bad_rotate_options_fail_with_one_line_before_any_work(tmp_path, capsys, args, match):
    model = tiny_qwen2_vl() if "--vlm" in args else tiny_llama()
    args = [a for a in args if a != "--vlm"]
    out = tmp_path / "never"
    assert cli.main(["quantize", "--method", "mbq", "--model", str(model), "--output", str(out), "--bits", "4",
                     "--act-bits", "8", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_rotated_w8a8_checkpoint_runs_the_online_hadamard_in_the_transformers_runtime(tmp_path):
    """W8A8 is nearly lossless, so the rotated checkpoint served by overdrive's transformers runtime must
    give the float model's logits closely, which it cannot without the online Hadamard on down_proj's
    inputs (the weights were rotated for it). Only down_proj layers carry the transform."""
    from transformers import AutoModelForCausalLM

    import overdrive.transformers  # noqa: F401
    from overdrive.mbq.export import export_compressed_tensors

    path = tiny_llama()
    out = tmp_path / "rot"
    assert cli.main(["quantize", "--method", "mbq", "--model", str(path), "--output", str(out), "--bits", "8",
                     "--act-bits", "8", "--baseline", "rtn", "--rotate", "full"]) == 0
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids=ids).logits
        q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        got = q(input_ids=ids).logits
        layer = q.model.layers[0]
        assert layer.mlp.down_proj.cfg.online_hadamard == 256
        assert layer.self_attn.q_proj.cfg.online_hadamard == 0
        for lyr in q.model.layers:  # the same weights without the online transform
            lyr.mlp.down_proj.cfg = lyr.self_attn.q_proj.cfg
        wrong = q(input_ids=ids).logits
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.02
    assert float((wrong - ref).norm() / ref.norm()) > 10 * rel
    with pytest.raises(ConfigError, match="online Hadamard before down_proj"):  # stock engines cannot apply it
        export_compressed_tensors(out, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("kw,match", [(dict(rotation="full"), "exactly when rotation is 'full'"),
                                      (dict(rotation="residual", online_hadamard=64), "exactly when"),
                                      (dict(rotation="full", online_hadamard=96), "power of two")])
def test_rotation_config_is_validated(kw, match):
    with pytest.raises(ConfigError, match=match):
        MBQConfig(bits=4, act_bits=8, **kw)

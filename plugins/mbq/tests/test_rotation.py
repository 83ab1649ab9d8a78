"""Rotation (QuaRot/SpinQuant style) preserves the float model; the runtime applies the online part."""
from __future__ import annotations

import pytest
import torch

from overdrive import ConfigError
from overdrive.mbq.rotation import online_block, rotate_model
from overdrive.testing import tiny_llama


def _model(**overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama(**overrides), dtype=torch.float64).eval()


@pytest.mark.parametrize("mode,overrides", [
    ("residual", {}), ("full", {}),
    ("full", {"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1,
              "tie_word_embeddings": True})])
def test_rotated_float_model_equals_the_original_in_float64(mode, overrides):
    model = _model(**overrides)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in model.named_modules():  # the fixture's norms are all 1: give them weights to fold
            if name.endswith("norm"):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g, dtype=torch.float64) + 0.5)
        ref = model(input_ids=ids).logits
        emb_before = model.model.embed_tokens.weight.clone()
        info = rotate_model(model, mode, seed=5)
        got = model(input_ids=ids).logits
    # transformers' LlamaRMSNorm computes in float32 even for a float64 model: relative 1e-6
    assert (got - ref).abs().max() < 1e-6 * ref.abs().max()
    # it did rotate: norms are weightless and the embedding changed
    assert (model.model.embed_tokens.weight - emb_before).abs().max() > 1e-3
    assert all(bool((m.weight == 1).all()) for n, m in model.named_modules() if n.endswith("norm"))
    assert info == {"rotation": mode, "online_hadamard": online_block(model.config.intermediate_size)
                    if mode == "full" else 0}
    if overrides.get("tie_word_embeddings"):  # 96 = 3 x 32: a composite random Hadamard; the head untied
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert model.config.tie_word_embeddings is False


def test_online_block_is_the_largest_power_of_two_factor():
    assert online_block(1536) == 512 and online_block(256) == 256 and online_block(11008) == 256
    assert online_block(1 << 14) == 4096


def test_bad_mode_is_named():
    with pytest.raises(ConfigError, match="--rotate must be one of"):
        rotate_model(torch.nn.Linear(2, 2), "quarot")


def test_rotated_w8a8_checkpoint_runs_the_online_hadamard_in_the_transformers_runtime(tmp_path):
    """W8A8 is nearly lossless, so the rotated checkpoint served by overdrive's transformers runtime must
    give the float model's logits closely, which it cannot without the online Hadamard on down_proj's
    inputs (the weights were rotated for it). Only down_proj layers carry the transform."""
    from transformers import AutoModelForCausalLM

    import overdrive.transformers  # noqa: F401
    from overdrive import cli

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
        assert layer.mlp.down_proj.cfg.online_hadamard == online_block(256) == 256
        assert layer.self_attn.q_proj.cfg.online_hadamard == 0
        # without the online transform the same weights are wrong
        layer_cfgs = [(l.mlp.down_proj, l.mlp.down_proj.cfg) for l in q.model.layers]
        for lin, cfg in layer_cfgs:
            lin.cfg = type(cfg).from_dict({**cfg.to_dict(), "rotation": "residual", "online_hadamard": 0})
        wrong = q(input_ids=ids).logits
    from overdrive.mbq.export import export_compressed_tensors

    with pytest.raises(ConfigError, match="online Hadamard before down_proj"):  # stock engines cannot apply it
        export_compressed_tensors(out, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.02
    assert float((wrong - ref).norm() / ref.norm()) > 10 * rel


@pytest.mark.parametrize("kw,match", [(dict(rotation="full"), "exactly when rotation is 'full'"),
                                      (dict(rotation="residual", online_hadamard=64), "exactly when"),
                                      (dict(rotation="full", online_hadamard=96), "power of two")])
def test_rotation_config_is_validated(kw, match):
    from overdrive.mbq.config import MBQConfig

    with pytest.raises(ConfigError, match=match):
        MBQConfig(bits=4, act_bits=8, **kw)

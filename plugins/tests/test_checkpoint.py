"""overdrive.checkpoint.rewrite_checkpoint: streamed, size-bounded output shards, atomic output folder."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from overdrive.checkpoint import rewrite_checkpoint
from overdrive.config import ConfigError


def _source(tmp_path):
    """A two-shard checkpoint (with the index transformers writes) of float32 tensors."""
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    a = {f"layer{i}.weight": torch.randn(32, 16, generator=g) for i in range(4)}
    b = {f"layer{i}.weight": torch.randn(8, 64, generator=g) for i in range(4, 7)}
    b["layer4.bias"] = torch.randn(8, generator=g)
    save_file(a, str(src / "model-00001-of-00002.safetensors"))
    save_file(b, str(src / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {**dict.fromkeys(a, "model-00001-of-00002.safetensors"),
                                            **dict.fromkeys(b, "model-00002-of-00002.safetensors")}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps({"model_type": "test"}))
    (src / "tokenizer.json").write_text("{}")
    return src, {**a, **b}


def _transform(name, t):
    """weights split into two halves (int8 codes + a float scale row), biases dropped."""
    if name.endswith(".bias"):
        return {}
    scale = t.abs().amax(dim=1, keepdim=True) / 127
    return {name.replace(".weight", ".codes"): torch.round(t / scale).to(torch.int8),
            name.replace(".weight", ".scale"): scale}


def _read_all(folder):
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return files, out


def test_small_shard_limit_writes_several_shards_with_a_consistent_index(tmp_path):
    src, tensors = _source(tmp_path)
    expected = {}
    for name, t in tensors.items():
        expected.update(_transform(name, t))
    limit = 1200  # bytes: a 32x16 int8 block (512) + its scale (128) fit, two blocks do not
    out = rewrite_checkpoint(src, tmp_path / "out", _transform, {"quant_method": "test"}, max_shard_bytes=limit)
    files, got = _read_all(out)
    assert len(files) > 2
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:
        assert f.name.endswith(f"-of-{len(files):05d}.safetensors")
        assert set(load_file(f)) == {k for k, v in index["weight_map"].items() if v == f.name}
        assert sum(t.numel() * t.element_size() for t in load_file(f).values()) <= limit
    assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in files)
    conf = json.loads((out / "config.json").read_text())
    assert conf == {"model_type": "test", "quantization_config": {"quant_method": "test"}}
    assert (out / "tokenizer.json").read_text() == "{}"
    assert not list(tmp_path.glob(".out.*")) and not list(out.glob(".part-*"))


def test_default_limit_writes_one_model_safetensors(tmp_path):
    src, tensors = _source(tmp_path)
    out = rewrite_checkpoint(src, tmp_path / "out", lambda n, t: {n: t}, {"quant_method": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_a_tensor_written_twice_or_an_existing_output_is_an_error_and_nothing_is_left(tmp_path):
    src, _ = _source(tmp_path)
    with pytest.raises(ConfigError, match="would be written twice"):
        rewrite_checkpoint(src, tmp_path / "out", lambda n, t: {"same": t}, {"quant_method": "test"})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        rewrite_checkpoint(src, tmp_path / "taken", lambda n, t: {n: t}, {"quant_method": "test"})


def test_transformers_loads_a_sharded_rewrite_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from overdrive.testing import tiny_llama

    src = tiny_llama()
    out = rewrite_checkpoint(src, tmp_path / "out", lambda n, t: {n: t}, {"quant_method": "none"},
                             max_shard_bytes=200_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    conf = json.loads((out / "config.json").read_text())
    conf.pop("quantization_config")  # transformers would look for a registered "none" quantizer
    (out / "config.json").write_text(json.dumps(conf))
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)

"""MBQ -> compressed-tensors export: the written tensors decode (with an independent bit-stream reader and
compressed-tensors' own unpacker) to the same float64 weights as the MBQ checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from overdrive import ConfigError, cli
from overdrive.kernels import dequantize_reference, unpack
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.export import dense_pack, export_compressed_tensors
from overdrive.mbq.quantize import quantize
from overdrive.testing import tiny_llama


def stream_unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Independent reader: each row's int32 words as one little-endian integer, code i at bits*i."""
    out = []
    for row in words.tolist():
        v = sum((w & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(row))
        out.append([(v >> (bits * i)) & ((1 << bits) - 1) for i in range(n)])
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("bits,n", [(3, 40), (3, 64), (4, 24), (4, 13)])
def test_dense_pack_is_a_little_endian_bit_stream(bits, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g)
    words = dense_pack(codes, bits)
    assert words.shape == (5, -(-n * bits // 32)) and words.dtype == torch.int32
    assert torch.equal(stream_unpack(words, bits, n), codes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    made = {}

    def get(name: str, **kw):
        if name not in made:
            mbq = quantize(tiny_llama(), root / f"mbq-{name}", MBQConfig(**{"baseline": "rtn", **kw}))
            made[name] = (mbq, export_compressed_tensors(mbq, root / f"ct-{name}"))
        return made[name]

    return get


@pytest.mark.parametrize("bits", [3, 4])
def test_weight_only_export_decodes_to_the_mbq_weights(exported, bits):
    from compressed_tensors.quantization import QuantizationConfig

    mbq, ct = exported(f"w{bits}", bits=bits, group_size=64)
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "overdrive"})
    w = parsed.config_groups["group_0"].weights
    assert (parsed.format, w.num_bits, w.symmetric, w.strategy, w.group_size) == \
        ("pack-quantized", bits, False, "group", 64)
    assert "lm_head" in parsed.ignore and qc["quant_method"] == "compressed-tensors"
    a, b = load_file(mbq / "model.safetensors"), load_file(ct / "model.safetensors")
    p = "model.layers.1.mlp.down_proj"  # (128 out, 256 in)
    n, k = 128, 256
    assert b[f"{p}.weight_packed"].shape == (n, k * bits // 32)
    assert b[f"{p}.weight_zero_point"].shape == (n * bits // 32, k // 64)
    assert b[f"{p}.weight_shape"].tolist() == [n, k]
    codes = stream_unpack(b[f"{p}.weight_packed"], bits, k).double()
    zeros = stream_unpack(b[f"{p}.weight_zero_point"].T.contiguous(), bits, n).T.double()
    scale = b[f"{p}.weight_scale"].double()
    got = (codes - zeros.repeat_interleave(64, 1)) * scale.repeat_interleave(64, 1)
    want = dequantize_reference(a[f"{p}.qweight"], a[f"{p}.scales"].double(), a[f"{p}.zeros"], bits, 64, k).double()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if bits == 4:  # compressed-tensors' own unpacker reads the 4-bit layout (8 codes per word) the same way
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        signed = unpack_from_int32(b[f"{p}.weight_packed"], 4, torch.Size([n, k])).double()
        zp = unpack_from_int32(b[f"{p}.weight_zero_point"], 4, torch.Size([n, k // 64]), packed_dim=0).double()
        torch.testing.assert_close((signed - zp.repeat_interleave(64, 1)) * scale.repeat_interleave(64, 1), want,
                                   rtol=0, atol=0)
    assert not any(name.endswith((".qweight", ".scales", ".zeros")) for name in b)
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


@pytest.mark.parametrize("bits,extra", [
    (4, {}), (8, {}),
    # GPTQ's codes after an offline (residual) rotation: a plain checkpoint with its own LM head
    (4, dict(baseline="gptq", rotation="residual"))])
def test_act8_export_keeps_codes_and_scales(exported, bits, extra):
    mbq, ct = exported(f"w{bits}a8{'-rot' if extra else ''}", bits=bits, act_bits=8, **extra)
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["overdrive"]["rotation"] == extra.get("rotation", "none")
    if extra:
        conf = json.loads((ct / "config.json").read_text())
        t = load_file(ct / "model.safetensors")
        assert conf["tie_word_embeddings"] is False and not torch.equal(t["lm_head.weight"], t["model.embed_tokens.weight"])
    grp = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized"
    assert (grp["weights"]["num_bits"], grp["weights"]["strategy"], grp["weights"]["symmetric"]) == (bits, "channel", True)
    assert (grp["input_activations"]["strategy"], grp["input_activations"]["dynamic"]) == ("token", True)
    a, b = load_file(mbq / "model.safetensors"), load_file(ct / "model.safetensors")
    p = "model.layers.0.self_attn.o_proj"
    want = a[f"{p}.qweight"].to(torch.int16) if bits == 8 else unpack(a[f"{p}.qweight"], 4, 128).to(torch.int16) - 8
    assert b[f"{p}.weight"].dtype == torch.int8 and torch.equal(b[f"{p}.weight"].to(torch.int16), want)
    assert b[f"{p}.weight_scale"].shape == (128, 1)
    assert torch.equal(b[f"{p}.weight_scale"][:, 0], a[f"{p}.scales"].float())


def test_export_cli_and_errors(exported, tmp_path, capsys):
    mbq, _ = exported("w4", bits=4, group_size=64)
    out = tmp_path / "ct"
    assert cli.main(["export", "--method", "mbq", "--model", str(mbq), "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    capsys.readouterr()
    rc = cli.main(["export", "--method", "mbq", "--model", str(tiny_llama()), "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "quantization_config.quant_method is None, expected 'mbq'" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="already exists"):
        export_compressed_tensors(mbq, out)


def test_quantize_straight_to_compressed_tensors(tmp_path):
    out = tmp_path / "ct"
    assert cli.main(["quantize", "--method", "mbq", "--model", str(tiny_llama()), "--output", str(out),
                     "--bits", "4", "--group-size", "64", "--baseline", "rtn", "--format", "compressed-tensors"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary MBQ checkpoint left

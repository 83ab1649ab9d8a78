"""MBQ format, RTN baseline and runtime method against closed forms and float64 references."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from overdrive import ConfigError, cli
from overdrive.kernels import dequantize_reference, unpack
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.method import METHOD
from overdrive.mbq.quant import rtn_group_asymmetric
from overdrive.mbq.quantize import quantize
from overdrive.testing import tiny_llama


@pytest.mark.parametrize("kw,match", [
    ({"bits": 5}, "MBQConfig.bits must be"),
    ({"bits": 8}, "weight-only schemes use bits 3 or 4"),
    ({"group_size": 100}, "multiple of 32"),
    ({"bits": 3, "act_bits": 8}, "W4A8 or W8A8"),
    ({"zero_point": False}, "asymmetric"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        MBQConfig(**kw)


def test_config_round_trip():
    c = MBQConfig(bits=3, group_size=64, baseline="rtn")
    assert MBQConfig.from_json(c.to_json()) == c and c.scheme == "W3"
    assert MBQConfig(bits=8, act_bits=8).scheme == "W8A8"


def test_rtn_closed_form():
    # one group of 32 values spanning [-1, 2] at 4 bits: scale = 3/15, zero = round(1/scale) = 5
    w = torch.linspace(-1, 2, 32, dtype=torch.float64).reshape(1, 32)
    out = rtn_group_asymmetric(w, 4, 32)
    assert out["scales"].float().item() == pytest.approx(0.2, rel=1e-3)
    assert out["zeros"].item() == 5
    codes = unpack(out["qweight"], 4, 32).double()
    assert torch.equal(codes, torch.clamp(torch.round(w / 0.2) + 5, 0, 15))


@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_error_is_bounded_by_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 256, generator=g, dtype=torch.float64)
    out = rtn_group_asymmetric(w, bits, 64)
    deq = dequantize_reference(out["qweight"], out["scales"].float(), out["zeros"], bits, 64, 256).double()
    step = out["scales"].double().repeat_interleave(64, 1)
    # half a quantization step, plus the float16 rounding of the stored scale
    assert ((deq - w).abs() <= step / 2 + w.abs() * 2e-3 + 1e-6).all()


def test_method_apply_matches_dequantized_float64():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 128, generator=g)
    cfg = MBQConfig(bits=3, group_size=64, baseline="rtn")
    p = rtn_group_asymmetric(w, 3, 64)
    specs = {s.name: s for s in METHOD.param_specs(128, 40, cfg)}
    for name, t in p.items():
        assert tuple(t.shape) == specs[name].shape, name
    x = torch.randn(3, 128, generator=g)
    y = METHOD.apply(x, METHOD.process_after_loading(dict(p), cfg), None, cfg)
    ref = x.double() @ dequantize_reference(p["qweight"], p["scales"], p["zeros"], 3, 64, 128).double().T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_group_straddling_a_tp_shard_is_rejected():
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.down_proj: 96 input features per tensor-parallel "
                                          r"shard is not a multiple of the group size 128"):
        METHOD.validate_partition(96, [64], MBQConfig(), prefix="model.layers.0.mlp.down_proj")


def test_checkpoint_from_the_cli(tmp_path, capsys):
    out = tmp_path / "llama-w3"
    rc = cli.main(["quantize", "--method", "mbq", "--model", str(tiny_llama()), "--output", str(out),
                   "--bits", "3", "--group-size", "64", "--baseline", "rtn"])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mbq" and qc["bits"] == 3 and qc["group_size"] == 64 and qc["baseline"] == "rtn"
    t = load_file(out / "model.safetensors")
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (128, 256 // 32 * 3)
    assert t["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    assert t["model.layers.0.mlp.down_proj.zeros"].shape == (128, 4)
    assert "lm_head.weight" in t and "model.embed_tokens.weight" in t  # left in 16/32 bits
    assert (out / "tokenizer.json").is_file()


def test_bad_inputs_write_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    base = tiny_llama()
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 7] = float("nan")
    save_file(tensors, str(src / "model.safetensors"))
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"'model.layers.1.self_attn.o_proj.weight' \(128, 128\) has 1 NaN/inf"):
        quantize(src, out, MBQConfig(bits=4, baseline="rtn"))
    with pytest.raises(ConfigError, match="NaN/inf activations at decoder layer 1 .* on calibration (sample|batch) 0"):
        quantize(src, out, MBQConfig(bits=4, group_size=64, baseline="awq"))
    with pytest.raises(ConfigError, match="no such|config.json: not found"):
        quantize(tmp_path / "missing", out, MBQConfig(bits=4, baseline="rtn"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder


def test_per_channel_symmetric_closed_form():
    from overdrive.mbq.quant import rtn_act8_tensors, rtn_per_channel_symmetric

    w = torch.tensor([[0.7, -0.33, 0.1], [-2.0, 0.9, 0.5]])
    codes, scales = rtn_per_channel_symmetric(w, 4)
    assert scales.tolist() == pytest.approx([0.1, 2 / 7])
    assert codes.tolist() == [[7, -3, 1], [-7, 3, 2]]  # w / scale = -3.3, 3.15, 1.75
    t = rtn_act8_tensors(torch.randn(5, 16), 4)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (5, 2) and t["scales"].shape == (5,)
    assert rtn_act8_tensors(torch.randn(5, 16), 8)["qweight"].dtype == torch.int8


@pytest.mark.parametrize("bits", [4, 8])
def test_act8_method_matches_float64(bits):
    from overdrive.kernels import unpack
    from overdrive.mbq.quant import rtn_act8_tensors

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 64, generator=g)
    cfg = MBQConfig(bits=bits, act_bits=8, baseline="rtn")
    p = rtn_act8_tensors(w, bits)
    assert [tuple(p[s.name].shape) for s in METHOD.param_specs(64, 24, cfg)] == [tuple(p["qweight"].shape), (24,)]
    codes = p["qweight"].double() if bits == 8 else unpack(p["qweight"], 4, 64).double() - 8
    x = torch.randn(3, 64, generator=g, dtype=torch.float64)
    sx = x.abs().amax(-1) / 127
    xq = torch.clamp(torch.sign(x / sx[:, None]) * torch.floor((x / sx[:, None]).abs() + 0.5), -127, 127)
    ref = (xq @ codes.T) * sx[:, None] * p["scales"].double()[None, :]
    torch.testing.assert_close(METHOD.apply(x.float(), METHOD.process_after_loading(dict(p), cfg), None, cfg).double(),
                               ref, rtol=1e-4, atol=1e-4)
    assert MBQConfig(bits=bits, act_bits=8).zero_point is False
    with pytest.raises(ConfigError, match="symmetric"):
        MBQConfig(bits=bits, act_bits=8, zero_point=True)

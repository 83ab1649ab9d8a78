"""PCDVQ checkpoints from the CLI and the contract's torch path, against float64 references."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from overdrive import cli
from overdrive.config import ConfigError
from overdrive.kernels.hadamard import hadamard_matrix_of
from overdrive.pcdvq.codebook import codebook_digest, lloyd_max_chi
from overdrive.pcdvq.config import PCDVQConfig
from overdrive.pcdvq.method import METHOD
from overdrive.pcdvq.quantizer import hadamard_mixer, quantize_weight
from overdrive.testing import tiny_llama


def deq_float64(t: dict, cfg: PCDVQConfig, cb: torch.Tensor) -> torch.Tensor:
    """W from stored tensors, written plainly: per 8-vector scale * level * codeword, then W' T^T."""
    levels = torch.from_numpy(lloyd_max_chi(cfg.magnitude_bits)[0])
    d = t["dir_codes"].to(torch.int64) & 0xFFFF
    packed = t["mag_codes"].to(torch.int64)
    per = 8 // cfg.magnitude_bits
    n, v = d.shape
    wr = torch.empty(n, v * 8, dtype=torch.float64)
    for i in range(n):
        for j in range(v):
            m = (int(packed[i, j // per]) >> (cfg.magnitude_bits * (j % per))) & ((1 << cfg.magnitude_bits) - 1)
            wr[i, 8 * j:8 * j + 8] = float(t["scales"][i]) * levels[m] * cb[int(d[i, j])].double()
    tm = hadamard_matrix_of(v * 8, t["hadamard_signs"].double(), hadamard_mixer(cfg), cfg.hadamard_block)
    return wr @ tm.T


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcdvq") / "llama-pcdvq"
    rc = cli.main(["quantize", "--method", "pcdvq", "--model", str(tiny_llama()), "--output", str(out),
                   "--direction-bits", "8"])
    assert rc == 0
    return out


def test_cli_checkpoint_format(ckpt):
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "pcdvq" and qc["direction_bits"] == 8 and qc["magnitude_bits"] == 2
    assert qc["hadamard_block"] == 128  # gcd(128, 256) for the tiny Llama
    t = load_file(ckpt / "model.safetensors")
    p = "model.layers.0.mlp.down_proj"  # (128, 256)
    assert t[f"{p}.dir_codes"].dtype == torch.int16 and t[f"{p}.dir_codes"].shape == (128, 32)
    assert t[f"{p}.mag_codes"].dtype == torch.uint8 and t[f"{p}.mag_codes"].shape == (128, 8)
    assert t[f"{p}.scales"].shape == (128,) and t[f"{p}.hadamard_signs"].shape == (256,)
    assert f"{p}.weight" not in t and "model.embed_tokens.weight" in t  # unquantized tensors kept
    with safe_open(str(ckpt / "pcdvq" / "codebooks.safetensors"), framework="pt") as f:
        cb = f.get_tensor("directions")
        assert f.metadata()["codebook_digest"] == qc["codebook_digest"] == codebook_digest(cb)
    assert cb.shape == (256, 8)
    # the stored codes dequantize (plain float64) close to the original weight
    w = load_file(tiny_llama() / "model.safetensors")[f"{p}.weight"].double()
    cfg = METHOD.config_from_checkpoint(qc)
    got = deq_float64({k.removeprefix(p + "."): v for k, v in t.items() if k.startswith(p + ".")}, cfg, cb)
    err = float((got - w).norm() / w.norm())
    assert err < 0.6, err


def test_contract_apply_matches_float64(ckpt):
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    cfg = METHOD.config_from_checkpoint(qc)
    t = load_file(ckpt / "model.safetensors")
    p = "model.layers.1.self_attn.o_proj"
    params = {k.removeprefix(p + "."): v for k, v in t.items() if k.startswith(p + ".")}
    specs = {s.name: s for s in METHOD.param_specs(128, 128, cfg)}
    assert {n: (tuple(v.shape), v.dtype) for n, v in params.items()} == {n: (s.shape, s.dtype) for n, s in specs.items()}
    cb = load_file(ckpt / "pcdvq" / "codebooks.safetensors")["directions"]
    w = deq_float64(params, cfg, cb)
    x = torch.randn(3, 5, 128)
    bias = torch.randn(128)
    y = METHOD.apply(x, METHOD.process_after_loading(dict(params), cfg), bias, cfg)
    ref = x.double() @ w.T + bias.double()
    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_shard_straddling_a_hadamard_block_is_rejected():
    cfg = PCDVQConfig(direction_bits=8, hadamard_block=128)
    METHOD.validate_partition(256, [64], cfg, prefix="x")
    with pytest.raises(ConfigError, match="straddle"):
        METHOD.validate_partition(64, [128], cfg, prefix="model.layers.0.mlp.down_proj")


def test_quantize_rejects_bad_shapes_and_existing_output(tmp_path):
    cfg = PCDVQConfig(direction_bits=8, hadamard_block=64)
    with pytest.raises(ConfigError, match="Hadamard block 64"):
        quantize_weight("a.weight", torch.randn(4, 96), cfg)
    out = tmp_path / "exists"
    out.mkdir()
    assert cli.main(["quantize", "--method", "pcdvq", "--model", str(tiny_llama()), "--output", str(out),
                     "--direction-bits", "8"]) == 2


def test_codebook_digest_mismatch_refused(monkeypatch, tmp_path):
    from overdrive.pcdvq.runtime import load_codebook

    monkeypatch.setenv("OVERDRIVE_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="codebook_digest"):
        load_codebook(PCDVQConfig(direction_bits=6, codebook_samples=2048, codebook_digest="0" * 16))


def test_code_path_matches_the_dense_path(ckpt, monkeypatch):
    """The kernel path (codes kept, overdrive.kernels.vq_linear, here in Triton's interpreter) equals
    the dense CPU path on a stored layer."""
    from overdrive.pcdvq.codebook import lloyd_max_chi
    from overdrive.pcdvq.quantizer import dir_from_int16, unpack_mags
    from overdrive.pcdvq.runtime import load_codebook

    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    cfg = METHOD.config_from_checkpoint(qc)
    t = load_file(ckpt / "model.safetensors")
    p = "model.layers.0.mlp.gate_proj"
    params = {k.removeprefix(p + "."): v for k, v in t.items() if k.startswith(p + ".")}
    x = torch.randn(2, 128)
    dense = METHOD.apply(x, METHOD.process_after_loading(dict(params), cfg), None, cfg)
    coded = {"dir_codes": dir_from_int16(params["dir_codes"]), "mag_codes": unpack_mags(params["mag_codes"], 2),
             "scales": params["scales"], "codebook": load_codebook(cfg),
             "levels": torch.from_numpy(lloyd_max_chi(2)[0]).float(), "hadamard_signs": params["hadamard_signs"]}
    monkeypatch.setenv("OVERDRIVE_KERNELS", "interpret")
    torch.testing.assert_close(METHOD.apply(x, coded, None, cfg), dense, atol=1e-4, rtol=1e-4)


def test_cli_hessian_aware_checkpoint(ckpt, tmp_path):
    """--hessian: block 0's q_proj equals the leaf quantizer on the Hessian of its inputs taken here with
    a transformers hook on the float model (block 0 sees no quantized layer), and its output error on
    those inputs is lower than the plain checkpoint's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.pcdvq.gptvq import quantize_weight_hessian

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the light of the sun is refracted. " * 40)
    out = tmp_path / "llama-pcdvq-h"
    rc = cli.main(["quantize", "--method", "pcdvq", "--model", str(tiny_llama()), "--output", str(out),
                   "--direction-bits", "8", "--hessian", "--calib", str(text), "--calib-samples", "4",
                   "--calib-len", "32", "--device", "cpu"])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = METHOD.config_from_checkpoint(qc)
    cb = load_file(out / "pcdvq" / "codebooks.safetensors")["directions"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama())
    ids = torch.tensor(tok(text.read_text(), add_special_tokens=False)["input_ids"][:4 * 32]).reshape(4, 32)
    xs = []
    p = "model.layers.0.self_attn.q_proj"
    h = model.get_submodule(p).register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    h.remove()
    x = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double()
    w = model.get_submodule(p).weight.detach().double()
    ref = quantize_weight_hessian("q", w, 2 * x.T @ x / x.shape[0], cfg, cb)
    t = {k.removeprefix(p + "."): v for k, v in load_file(out / "model.safetensors").items() if k.startswith(p + ".")}
    assert torch.equal(t["dir_codes"], ref["dir_codes"]) and torch.equal(t["mag_codes"], ref["mag_codes"])
    assert torch.allclose(t["scales"], ref["scales"], rtol=1e-5, atol=0)
    plain = {k.removeprefix(p + "."): v for k, v in load_file(ckpt / "model.safetensors").items()
             if k.startswith(p + ".")}
    e_h = float(((w - deq_float64(t, cfg, cb)) @ x.T).norm())
    e_p = float(((w - deq_float64(plain, cfg, cb)) @ x.T).norm())
    assert e_h < e_p, (e_h, e_p)


def test_cli_hessian_needs_calibration_text(tmp_path, capsys):
    rc = cli.main(["quantize", "--method", "pcdvq", "--model", str(tiny_llama()), "--output", str(tmp_path / "o"),
                   "--direction-bits", "8", "--hessian", "--device", "cpu"])
    assert rc == 2 and "--hessian needs --calib" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

"""PCDVQ checkpoints loaded by transformers (overdrive's registered quantizer) and served by a real vLLM.

Reference: transformers on a float32 checkpoint whose linear weights are the PCDVQ weights dequantized
here in float64 from the stored codes and the checkpoint's stored codebooks (``W = W' T^T``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from overdrive.kernels.hadamard import hadamard_matrix_of
from overdrive.pcdvq.config import PCDVQConfig
from overdrive.pcdvq.quantize import quantize
from overdrive.pcdvq.quantizer import hadamard_mixer
from overdrive.testing import tiny_llama
from overdrive.testing.hf_generate import greedy_tokens
from overdrive.testing.vllm_server import VllmServer

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "hello world, this is"]
MAX_TOKENS = 8
SERVE = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
SUFFIXES = (".dir_codes", ".mag_codes", ".scales", ".hadamard_signs")


def dequantized_reference(ckpt: Path, out: Path) -> Path:
    import torch

    cfg = json.loads((ckpt / "config.json").read_text())
    qc = PCDVQConfig.from_dict({k: v for k, v in cfg.pop("quantization_config").items() if k != "quant_method"})
    books = load_file(ckpt / "pcdvq" / "codebooks.safetensors")
    cb, levels = books["directions"].double(), books["magnitudes"].double()
    t = load_file(ckpt / "model.safetensors")
    ref = {}
    for name, v in t.items():
        if name.endswith(".dir_codes"):
            p = name.removesuffix(".dir_codes")
            d = v.to(torch.int64) & 0xFFFF
            per, mb = 8 // qc.magnitude_bits, qc.magnitude_bits
            packed = t[f"{p}.mag_codes"].to(torch.int64)
            j = torch.arange(d.shape[1])
            m = (packed[:, j // per] >> (mb * (j % per))) & ((1 << mb) - 1)
            wr = (t[f"{p}.scales"].double()[:, None, None] * levels[m][..., None] * cb[d]).reshape(d.shape[0], -1)
            tm = hadamard_matrix_of(wr.shape[1], t[f"{p}.hadamard_signs"].double(), hadamard_mixer(qc),
                                    qc.hadamard_block)
            ref[f"{p}.weight"] = (wr @ tm.T).float()
        elif not name.endswith(SUFFIXES):
            ref[name] = v
    out.mkdir()
    save_file(ref, str(out / "model.safetensors"))
    for f in ckpt.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return quantize(tiny_llama(), tmp_path_factory.mktemp("pcdvq") / "llama-pcdvq",
                    PCDVQConfig(direction_bits=10, hadamard_block=64))


@pytest.fixture(scope="module")
def transformers_tokens(ckpt, tmp_path_factory) -> dict:
    ref = dequantized_reference(ckpt, tmp_path_factory.mktemp("ref") / "deq")
    q, deq = greedy_tokens(ckpt, PROMPTS, MAX_TOKENS), greedy_tokens(ref, PROMPTS, MAX_TOKENS)
    return {"q": q["tokens"], "q_layer": q["layer"], "ref": deq["tokens"], "ref_layer": deq["layer"]}


def test_transformers_loads_pcdvq_through_the_registered_quantizer(transformers_tokens):
    assert transformers_tokens["q_layer"] == "OverdriveLinear" and transformers_tokens["ref_layer"] == "Linear"
    assert transformers_tokens["q"] == transformers_tokens["ref"]


def test_vllm_serves_pcdvq_with_the_same_tokens_as_transformers(ckpt, transformers_tokens, tmp_path):
    with VllmServer(ckpt, SERVE, log_path=tmp_path / "vllm.log", tp=1) as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
    assert got == transformers_tokens["q"]

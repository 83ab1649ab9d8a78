"""MBQ checkpoints (RTN, AWQ, rotated AWQ+GPTQ) served by a real vLLM server and loaded by transformers.

Reference: transformers on a float32 checkpoint whose linear weights are the dequantized MBQ weights
(computed here from the stored codes in float64).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from overdrive.kernels import dequantize_reference
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.quantize import quantize
from overdrive.testing import tiny_llama
from overdrive.testing.hf_generate import greedy_tokens
from overdrive.testing.vllm_server import VllmServer

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "hello world, this is"]
MAX_TOKENS = 8
SERVE = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]


#: scheme -> MBQConfig options (the tiny Llama fixture: hidden 128, intermediate 256)
SCHEMES = {
    "w3g64": dict(bits=3, group_size=64, baseline="rtn"),
    "w4a8": dict(bits=4, act_bits=8, baseline="awq"),
    "w8a8": dict(bits=8, act_bits=8, baseline="rtn"),
    # rotated (residual stream and heads offline, an online Hadamard of block 256 before down_proj) and GPTQ
    # on AWQ's scales: the online transform of down_proj's inputs runs inside vLLM's linear method
    "w4a8-rot": dict(bits=4, act_bits=8, baseline="awq-gptq", rotation="full", online_hadamard=256),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mbq")
    made: dict[str, Path] = {}

    def get(scheme: str) -> Path:
        if scheme not in made:
            made[scheme] = quantize(tiny_llama(), root / f"llama-{scheme}", MBQConfig(**SCHEMES[scheme]))
        return made[scheme]

    return get


@pytest.fixture(scope="module")
def w3(checkpoints) -> Path:
    return checkpoints("w3g64")


def dequantized_reference(ckpt: Path, out: Path) -> Path:
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    t = load_file(ckpt / "model.safetensors")
    ref = {}
    for name, v in t.items():
        if name.endswith(".qweight"):
            p = name.removesuffix(".qweight")
            k = v.shape[1] * 32 // qc["bits"]
            ref[f"{p}.weight"] = dequantize_reference(v, t[f"{p}.scales"].double(), t[f"{p}.zeros"], qc["bits"],
                                                      qc["group_size"], k).float()
        elif not name.endswith((".scales", ".zeros")):
            ref[name] = v
    out.mkdir()
    save_file(ref, str(out / "model.safetensors"))
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def transformers_tokens(w3, tmp_path_factory) -> dict:
    ref = dequantized_reference(w3, tmp_path_factory.mktemp("ref") / "deq")
    mbq, deq = greedy_tokens(w3, PROMPTS, MAX_TOKENS), greedy_tokens(ref, PROMPTS, MAX_TOKENS)
    return {"mbq": mbq["tokens"], "mbq_layer": mbq["layer"], "ref": deq["tokens"], "ref_layer": deq["layer"]}


def test_transformers_loads_mbq_through_the_registered_quantizer(transformers_tokens):
    assert transformers_tokens["mbq_layer"] == "OverdriveLinear" and transformers_tokens["ref_layer"] == "Linear"
    assert transformers_tokens["mbq"] == transformers_tokens["ref"]


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_serves_mbq_w3_with_the_same_tokens_as_transformers(w3, transformers_tokens, tp, tmp_path):
    with VllmServer(w3, SERVE, log_path=tmp_path / "vllm.log", tp=tp) as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
    assert got == transformers_tokens["mbq"]


@pytest.mark.parametrize("scheme,tp", [("w4a8", 1), ("w8a8", 1), ("w4a8-rot", 1)])
def test_vllm_serves_act8_schemes_with_the_same_tokens_as_transformers(checkpoints, scheme, tp, tmp_path):
    """At TP > 1 a row-parallel shard quantizes its own slice of each token (per-shard activation
    scales, as vLLM's own int8 W8A8 does), so tokens are compared with transformers at TP 1 only."""
    ckpt = checkpoints(scheme)
    hf = greedy_tokens(ckpt, PROMPTS, MAX_TOKENS)
    assert hf["layer"] == "OverdriveLinear"
    with VllmServer(ckpt, SERVE, log_path=tmp_path / "vllm.log", tp=tp) as srv:
        got = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
    assert got == hf["tokens"]


def test_vllm_rejects_groups_straddling_tp_shards_at_startup(tmp_path):
    ckpt = quantize(tiny_llama(), tmp_path / "llama-w4g128", MBQConfig(bits=4, group_size=128, baseline="rtn"))
    with pytest.raises(RuntimeError, match="vLLM server exited"):
        with VllmServer(ckpt, SERVE, log_path=tmp_path / "vllm.log", tp=2):
            pass
    log = (tmp_path / "vllm.log").read_text(errors="replace")
    assert ("MBQ layer model.layers.0.self_attn.o_proj: 64 input features per tensor-parallel shard is not a "
            "multiple of the group size 128") in log


def test_mbq_calibrated_vlm_served_by_vllm_matches_transformers_on_video(tmp_path):
    from overdrive.testing import tiny_qwen2_vl
    from overdrive.testing.answers import transformers_video_answer, vllm_video_answer

    ckpt = quantize(tiny_qwen2_vl(), tmp_path / "vlm-mbq-w3", MBQConfig(bits=3, group_size=64, baseline="mbq"))
    hf = transformers_video_answer(ckpt)
    assert hf["decoder_layer"] == "OverdriveLinear" and hf["vision_layer"] == "Linear"  # vision tower stays 16-bit
    assert vllm_video_answer(ckpt, hf["prompt"]) == hf["tokens"]


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    t = load_file(src / "model.safetensors")
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("case,expected", [
    ("misshaped", "model.layers.1.mlp.down_proj.scales: checkpoint tensor of shape (128, 3)"),
    ("missing", "the checkpoint has no zeros for this mbq-quantized layer"),
    ("unquantized", "quantization 'mbq' needs a checkpoint made by `overdrive quantize --method mbq`"),
])
def test_bad_checkpoints_fail_at_startup_with_a_message_naming_the_tensor(w3, tmp_path, case, expected):
    def misshape(t):
        t["model.layers.1.mlp.down_proj.scales"] = t["model.layers.1.mlp.down_proj.scales"][:, :3].clone()

    def drop(t):
        del t["model.layers.0.mlp.down_proj.zeros"]

    if case == "unquantized":
        ckpt, extra = tiny_llama(), ["--quantization", "mbq"]
    else:
        ckpt, extra = _edit_checkpoint(w3, tmp_path / case, misshape if case == "misshaped" else drop), []
    with pytest.raises(RuntimeError, match="vLLM server exited"):
        with VllmServer(ckpt, SERVE + extra, log_path=tmp_path / "vllm.log"):
            pass
    assert expected in (tmp_path / "vllm.log").read_text(errors="replace")

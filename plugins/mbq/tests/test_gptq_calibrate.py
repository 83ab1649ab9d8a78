"""GPTQ in MBQ's block-by-block calibration: plumbing against independently collected Hessians, the
modality token weights, and the checkpoint from the CLI."""
from __future__ import annotations

import copy

import pytest
import torch

from overdrive import cli
from overdrive.mbq.calibrate import (GPTQOptions, block_linears, calibrate, decoder_layers, gptq_blocks,
                                     gradient_ratios, gptq_grid)
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.data import build_samples, builtin_records
from overdrive.mbq.gptq import gptq
from overdrive.testing import tiny_llama, tiny_qwen2_vl


@pytest.fixture(scope="module")
def vlm():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_qwen2_vl()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(path)
    samples = build_samples(proc, builtin_records(with_images=True)[:3],
                            [model.config.image_token_id, model.config.video_token_id])
    return model, samples


def _layer0_inputs(model, samples, names):
    """Inputs of layer 0's linears on every sample, from forward hooks on the whole model (layer 0's
    inputs do not depend on any quantized weight)."""
    layer = decoder_layers(model)[0]
    mods = {n: m for _, n, m in block_linears(layer)}
    got = {n: [] for n in names}
    hs = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
          for n in names]
    try:
        with torch.no_grad():
            for s in samples:
                model(**s.inputs, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return {n: v for n, v in got.items()}, mods


@pytest.mark.parametrize("weighted", [False, True])
def test_block_gptq_uses_the_layer_inputs_and_the_modality_token_weights(vlm, weighted):
    model, samples = vlm
    cfg = MBQConfig(bits=3, group_size=64, baseline="mbq-gptq" if weighted else "gptq")
    m = copy.deepcopy(model)
    ratios = gradient_ratios(m, samples) if weighted else None
    before = copy.deepcopy(m)
    opts = GPTQOptions(hessian_dtype=torch.float64)
    results = gptq_blocks(m, samples, cfg, ratios=ratios, opts=opts)
    assert all(r.loss <= r.rtn_loss for r in results)  # on the calibration objective of each linear
    names = ("q_proj", "down_proj")
    xs, mods0 = _layer0_inputs(before, samples, names)
    after = {n: l for _, n, l in block_linears(decoder_layers(m)[0])}
    for n, branch in zip(names, ("attn", "mlp")):
        x = torch.cat(xs[n]).double()
        if weighted:  # MBQ: caption tokens 1, vision tokens the layer's gradient ratio, other tokens 0
            w = torch.cat([s.caption_mask.double() + s.vision_mask.double() * ratios[0][branch] for s in samples])
            assert (w == 0).any() and ((w > 0) & (w != 1)).any()
        else:
            w = torch.ones(x.shape[0], dtype=torch.float64)
        h = 2 * (x * w[:, None]).T @ x / w.sum()
        expect = gptq(mods0[n].weight, h, gptq_grid(cfg))
        assert torch.equal(after[n].gptq_codes.float(), expect.codes)
        # scales are stored in float16: the Hessians' different summation orders may move one by an ulp
        torch.testing.assert_close(after[n].gptq_scales, expect.scales.half(), rtol=1e-3, atol=0)
        torch.testing.assert_close(after[n].weight, expect.weight, rtol=2e-3, atol=1e-6)  # dequantized weights


@pytest.mark.slow
def test_mbq_gptq_differs_from_gptq_and_both_stay_finite(vlm):
    model, samples = vlm
    codes = {}
    for baseline in ("gptq", "mbq-gptq", "awq-gptq"):
        m = copy.deepcopy(model)
        calibrate(m, samples, MBQConfig(bits=4, act_bits=8, baseline=baseline))
        with torch.no_grad():
            assert torch.isfinite(m(**samples[0].inputs).logits).all()
        codes[baseline] = torch.cat([l.gptq_codes.flatten().float() for layer in decoder_layers(m)
                                     for _, _, l in block_linears(layer)])
    assert not torch.equal(codes["gptq"], codes["mbq-gptq"])
    assert not torch.equal(codes["awq-gptq"], codes["mbq-gptq"])


def test_gptq_checkpoint_from_the_cli_holds_the_calibrated_codes(tmp_path):
    """The packed checkpoint dequantizes to the weights GPTQ left in the calibrated model, and its
    output on the calibration text is closer to the float model's than RTN's checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import overdrive.transformers  # noqa: F401

    path = tiny_llama()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 37} token{i % 11}." for i in range(3000)))
    outs = {}
    for baseline in ("gptq", "rtn"):
        outs[baseline] = tmp_path / baseline
        args = ["quantize", "--method", "mbq", "--model", str(path), "--output", str(outs[baseline]),
                "--bits", "3", "--group-size", "64", "--baseline", baseline]
        if baseline != "rtn":
            args += ["--calib-data", str(text), "--samples", "4", "--seq-len", "64"]
        assert cli.main(args) == 0
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text.read_text()[:2000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids=ids).logits
        err = {b: float((AutoModelForCausalLM.from_pretrained(o, dtype=torch.float32)(input_ids=ids).logits - ref)
                        .pow(2).mean()) for b, o in outs.items()}
    assert err["gptq"] < err["rtn"]
    from safetensors import safe_open

    with safe_open(str(outs["gptq"] / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "gptq_" in k]

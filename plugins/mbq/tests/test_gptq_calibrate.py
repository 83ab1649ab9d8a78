"""GPTQ in MBQ's block-by-block calibration (the LLM calibration layer): the CLI checkpoint's codes
against the independent float64 GPTQ on a layer's inputs recorded here, MBQ's token weights against the
weighted least-squares closed form, and option checks."""
from __future__ import annotations

import copy

import pytest
import torch

from overdrive import cli
from overdrive.contracts.llm_calibration import load_for_calibration
from overdrive.kernels import unpack
from overdrive.mbq.calibrate import GPTQOptions, calibrate_blocks
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.data import build_calibration, build_samples, builtin_records, load_records
from overdrive.mbq.gptq import ChannelSymmetric, GroupAsymmetric
from overdrive.testing import tiny_llama, tiny_qwen2_vl
from overdrive.testing.gptq_reference import gptq_reference


def _inputs_of(model, module, batches) -> torch.Tensor:
    """Every input row of ``module`` over ``batches``, from a forward pre-hook on the plain model."""
    rows = []
    h = module.register_forward_pre_hook(lambda _m, a: rows.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        h.remove()
    return torch.cat(rows)


def _tensors(ckpt, prefix):
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        return {k: f.get_tensor(f"{prefix}.{k}") for k in ("qweight", "scales", "zeros") if f"{prefix}.{k}" in names}


@pytest.mark.parametrize("scheme,grid", [
    (["--bits", "3", "--group-size", "64"], GroupAsymmetric(3, 64)),  # groups' scales as the columns are reached
    (["--bits", "4", "--act-bits", "8", "--act-order", "--damp", "0.05"], ChannelSymmetric(4)),
])
def test_cli_gptq_codes_equal_the_float64_reference_on_the_layer_inputs(tmp_path, scheme, grid):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llama()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 37} token{i % 11}." for i in range(3000)))
    out = tmp_path / "gptq"
    assert cli.main(["quantize", "--method", "mbq", "--model", str(path), "--output", str(out), *scheme,
                     "--baseline", "gptq", "--calib-data", str(text), "--samples", "4", "--seq-len", "64"]) == 0
    # the same calibration chunks; layer 0's linears read inputs no quantized weight changes
    samples = build_calibration(AutoTokenizer.from_pretrained(path), load_records(text), [], n_samples=4, seq_len=64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    x = _inputs_of(model, attn.q_proj, [s.inputs for s in samples])
    act_order = "--act-order" in scheme
    damp = float(scheme[scheme.index("--damp") + 1]) if "--damp" in scheme else 0.01
    for name in ("q_proj", "k_proj", "v_proj"):  # one Hessian, three weights
        w = getattr(attn, name).weight
        codes, scales, zeros = gptq_reference(w, x, None, grid, damp, act_order)
        got = _tensors(out, f"model.layers.0.self_attn.{name}")
        if grid.group_size is None:
            got_codes = unpack(got["qweight"], 4, w.shape[1]).double() - 8
            assert "zeros" not in got
        else:
            got_codes = unpack(got["qweight"], 3, w.shape[1]).double()
            assert torch.equal(got["zeros"].double(), zeros)
        assert torch.equal(got_codes, codes), name
        assert torch.equal(got["scales"], scales.half()), name


@pytest.fixture(scope="module")
def vlm():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_qwen2_vl()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(path)
    samples = build_samples(proc, builtin_records(with_images=True),
                            [model.config.image_token_id, model.config.video_token_id])
    return model, samples


def test_mbq_token_weights_give_the_weighted_least_squares_solution(vlm):
    """GPTQ keeps the not-yet-quantized columns at the least-squares optimum given the quantized ones, so
    the last input column (natural order) ends at the closed form of a one-variable weighted (dampened)
    least-squares problem on the layer's inputs, with MBQ's token weights: caption 1, vision the
    layer's ratio, other tokens 0. Checked in float64 on layer 0's q_proj of the tiny VLM, with all
    codes also against the independent float64 GPTQ under the same weights."""
    model, samples = vlm
    ratios = [{"attn": 4.0, "mlp": 0.25}] * model.config.text_config.num_hidden_layers
    damp = 0.01
    m = copy.deepcopy(model)
    w = m.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    x = _inputs_of(model, model.model.language_model.layers[0].self_attn.q_proj,
                   [s.inputs for s in samples]).double()
    run = load_for_calibration(m, device="cpu", compute_dtype=torch.float32)
    try:
        calibrate_blocks(run, samples, MBQConfig(bits=4, act_bits=8, baseline="gptq"), ratios=ratios,
                         gptq_opts=GPTQOptions(percdamp=damp))
    finally:
        run.close()
    q = m.model.language_model.layers[0].self_attn.q_proj
    k = w.shape[1]
    codes = unpack(q.gptq_qweight, 4, k).double() - 8
    scale = q.gptq_scales.double()
    tok_w = torch.cat([s.caption_mask.reshape(-1).double() + s.vision_mask.reshape(-1).double() * 4.0
                       for s in samples])
    assert bool((tok_w == 0).any()) and bool((tok_w == 4.0).any()) and bool((tok_w == 1.0).any())

    def last_column_codes(weights: torch.Tensor) -> torch.Tensor:
        h = 2 * (x * weights[:, None]).T @ x / weights.sum()
        h = h + damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
        d = w.double()[:, :-1] - codes[:, :-1] * scale[:, None]  # the quantized columns' errors
        v = w.double()[:, -1] + d @ h[:-1, -1] / h[-1, -1]  # argmin_v (d, w_last - v) H (d, w_last - v)^T
        return torch.clamp(torch.round(v / scale), -7, 7)

    assert torch.equal(codes[:, -1], last_column_codes(tok_w))
    # the weights decide it: uniform weights give other codes for the same quantized columns
    assert not torch.equal(codes[:, -1], last_column_codes(torch.ones_like(tok_w)))
    ref_codes, ref_scales, _ = gptq_reference(w, x, tok_w, ChannelSymmetric(4), damp, False)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scales.half().double())


@pytest.mark.parametrize("args,match", [
    (["--baseline", "awq", "--damp", "0.1"], "--damp is a GPTQ option; --baseline awq runs no GPTQ"),
    (["--act-order"], "--act-order is a GPTQ option; --baseline mbq runs no GPTQ"),
    (["--baseline", "gptq", "--damp", "1.5"], r"GPTQ dampening must be in \[0, 1\), got 1.5"),
])
def test_bad_gptq_options_fail_with_one_line_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "never"
    assert cli.main(["quantize", "--method", "mbq", "--model", str(tmp_path / "no-model"), "--output", str(out),
                     *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(match, err), err
    assert not out.exists()


@pytest.mark.slow
def test_cli_mbq_gptq_on_the_tiny_vlm_serves_in_transformers_and_balances_the_modalities(tmp_path):
    """From the CLI on the tiny Qwen2.5-VL (built-in image-caption records): mbq-gptq's codes are not
    awq-gptq's (the gradient ratios weight the Hessians and the search), both checkpoints load through
    overdrive's transformers quantizer, and greedy decoding of a text prompt runs on finite logits."""
    from transformers import AutoModelForImageTextToText

    import overdrive.transformers  # noqa: F401

    path = tiny_qwen2_vl()
    outs = {}
    for baseline in ("awq-gptq", "mbq-gptq"):
        outs[baseline] = tmp_path / baseline
        assert cli.main(["quantize", "--method", "mbq", "--model", str(path), "--output", str(outs[baseline]),
                         "--bits", "4", "--group-size", "64", "--baseline", baseline, "--samples", "4"]) == 0
    p = "model.layers.0.self_attn.q_proj"  # as the checkpoint names it
    a, b = _tensors(outs["awq-gptq"], p), _tensors(outs["mbq-gptq"], p)
    assert a["qweight"].shape == b["qweight"].shape and not torch.equal(a["qweight"], b["qweight"])
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    for out in outs.values():
        m = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
        assert type(m.model.language_model.layers[0].self_attn.q_proj).__name__ == "OverdriveLinear"
        with torch.no_grad():
            assert torch.isfinite(m(input_ids=ids).logits).all()

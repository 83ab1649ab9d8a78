"""MBQ calibration against independent computations and its defining properties."""
from __future__ import annotations

import copy

import pytest
import torch

from overdrive import ConfigError
from overdrive.adapters.transformers.calibration import decoder_layers as _decoder_layers
from overdrive.contracts.llm_calibration import load_for_calibration
from overdrive.mbq.calibrate import GRID, fold_scales, layer_groups, search_group
from overdrive.mbq.calibrate import calibrate as _calibrate
from overdrive.mbq.calibrate import gradient_ratios as _gradient_ratios
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.data import build_samples, builtin_records
from overdrive.testing import tiny_llama, tiny_qwen2_vl


def decoder_layers(model):
    return _decoder_layers(model)[1]


def _with_run(fn, model, *args, **kw):
    run = load_for_calibration(model, device="cpu", compute_dtype=torch.float32)
    try:
        return fn(run, *args, **kw)
    finally:
        run.close()


def calibrate(model, samples, cfg, **kw):
    return _with_run(_calibrate, model, samples, cfg, **kw)


def gradient_ratios(model, samples):
    return _with_run(_gradient_ratios, model, samples)


@pytest.fixture(scope="module")
def vlm():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_qwen2_vl()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(path)
    samples = build_samples(proc, builtin_records(with_images=True)[:4],
                            [model.config.image_token_id, model.config.video_token_id])
    return model, samples


def test_masks_mark_image_placeholders_and_answer_tokens(vlm):
    model, samples = vlm
    for s in samples:
        ids = s.inputs["input_ids"][0]
        assert torch.equal(s.vision_mask, ids == model.config.image_token_id) and s.vision_mask.any()
        # the answer is the suffix after the generation prompt, and it is never a placeholder
        first = int(s.caption_mask.nonzero()[0])
        assert s.caption_mask[first:].all() and not s.caption_mask[:first].any()
        assert first > int(s.vision_mask.nonzero()[-1])


def test_folding_scales_preserves_the_float_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 99, 230, 41, 7]])
    with torch.no_grad():
        before = model(ids).logits
        g = torch.Generator().manual_seed(0)
        for layer in decoder_layers(model):
            for grp in layer_groups(layer):
                fold_scales(grp, torch.rand(grp.linears[0].in_features, generator=g) + 0.5)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-3)


def test_gradient_ratios_match_an_independent_autograd_computation(vlm):
    model, samples = vlm
    model = copy.deepcopy(model)
    got = gradient_ratios(model, samples)
    # independent: keep every o_proj/down_proj output, take autograd.grad of the summed caption loss
    layers = decoder_layers(model)
    per = {("attn", "vis"): [0.0] * len(layers), ("attn", "cap"): [0.0] * len(layers),
           ("mlp", "vis"): [0.0] * len(layers), ("mlp", "cap"): [0.0] * len(layers)}
    n_vis = n_cap = 0
    for s in samples:
        outs = {}
        hs = [l.self_attn.o_proj.register_forward_hook(lambda m, i, o, k=("attn", j): outs.__setitem__(k, o))
              for j, l in enumerate(layers)]
        hs += [l.mlp.down_proj.register_forward_hook(lambda m, i, o, k=("mlp", j): outs.__setitem__(k, o))
               for j, l in enumerate(layers)]
        ids = s.inputs["input_ids"]
        labels = torch.where(s.caption_mask[None], ids, torch.full_like(ids, -100))
        loss = model(**s.inputs, labels=labels).loss
        for h in hs:
            h.remove()
        keys = list(outs)
        grads = torch.autograd.grad(loss, [outs[k] for k in keys])
        for (branch, j), gr in zip(keys, grads):
            a = gr.abs().double().mean(-1).reshape(-1)
            per[(branch, "vis")][j] += float(a[s.vision_mask].sum())
            per[(branch, "cap")][j] += float(a[s.caption_mask].sum())
        n_vis += int(s.vision_mask.sum())
        n_cap += int(s.caption_mask.sum())
    for branch in ("attn", "mlp"):
        raw = [(per[(branch, "vis")][j] / n_vis) / (per[(branch, "cap")][j] / n_cap) for j in range(len(layers))]
        med = float(torch.tensor(raw).median())
        want = [max(r, med) for r in raw]
        assert [g[branch] for g in got] == pytest.approx(want, rel=1e-4)


def _features(model, samples, layer_idx=0):
    layer = decoder_layers(model)[layer_idx]
    grp = layer_groups(layer)[0]
    xs = []
    h = grp.linears[0].register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for s in samples:
            model(**s.inputs)
    h.remove()
    return grp, torch.cat(xs)


def test_search_objective_uses_the_token_weights(vlm):
    model, samples = vlm
    grp, x = _features(model, samples)
    cfg = MBQConfig(bits=3, group_size=64, baseline="mbq")
    vis = torch.cat([s.vision_mask for s in samples])
    cap = torch.cat([s.caption_mask for s in samples])
    w_mbq = cap.float() + vis.float() * 3.0
    w_awq = torch.ones_like(w_mbq)
    s_mbq, rho_mbq, loss_mbq, rtn = search_group(x, grp, w_mbq, cfg, "mae")
    s_awq, rho_awq, _, _ = search_group(x, grp, w_awq, cfg, "mae")
    assert rho_mbq in GRID and loss_mbq <= rtn + 1e-12
    # evaluate AWQ's choice under MBQ's objective by forcing the grid to that rho: never better
    from overdrive.mbq import calibrate as cal

    saved = cal.GRID[:]
    try:
        cal.GRID[:] = [rho_awq]
        _, _, loss_awq_under_mbq, _ = search_group(x, grp, w_mbq, cfg, "mae")
    finally:
        cal.GRID[:] = saved
    assert loss_mbq <= loss_awq_under_mbq + 1e-12


@pytest.mark.parametrize("baseline,distort,bits,act_bits", [("mbq", False, 3, 16), ("awq", False, 3, 16),
                                                          ("mbq", True, 3, 16), ("mbq", False, 4, 8),
                                                          ("awq", False, 8, 8)])
def test_calibration_never_does_worse_than_rtn_and_keeps_the_model_finite(vlm, baseline, distort, bits, act_bits):
    model, samples = vlm
    model = copy.deepcopy(model)
    cfg = MBQConfig(bits=bits, group_size=64, act_bits=act_bits, baseline=baseline)
    results = calibrate(model, samples, cfg, distort=distort)
    n_layers = len(decoder_layers(model))
    assert {r.layer for r in results} == set(range(n_layers))
    assert all(r.loss <= r.rtn_loss + 1e-12 for r in results)
    assert any(r.rho > 0 for r in results)  # the search is doing something on these activations
    with torch.no_grad():
        assert torch.isfinite(model(**samples[0].inputs).logits).all()


def test_text_only_mbq_runs_as_awq_with_a_warning():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llama()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    samples = build_samples(AutoTokenizer.from_pretrained(path), builtin_records(with_images=False)[:2], [])
    with pytest.warns(UserWarning, match="no vision tokens: running as AWQ"):
        results = calibrate(model, samples, MBQConfig(bits=4, group_size=64, baseline="mbq"))
    assert results and all(r.loss <= r.rtn_loss + 1e-12 for r in results)
    with pytest.raises(ConfigError, match="loss mode"):
        calibrate(model, samples, MBQConfig(bits=4, baseline="awq"), loss_mode="l1")

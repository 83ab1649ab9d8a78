"""ViDiT-Q plan format, quantization math and the quantized layer, against closed forms and float64."""
from __future__ import annotations

import json

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.kernels import unpack_reference
from overdrive.viditq.config import Identity, LayerPlan, Plan, Variant, split_steps
from overdrive.viditq.numerics import quantize_weight, relative_error, smoothing_factors, weight_channel_max
from overdrive.viditq.runtime import QuantState, ViDiTQLinear


def _plan(**kw) -> Plan:
    layers = {"blocks.0.attn.to_q": LayerPlan(16, 8, True, [Variant(8, False), Variant(4, True)], [0, 1]),
              "blocks.0.ff.net.2": LayerPlan(24, 16, False, [Variant(8, False)], [0, 0])}
    base = dict(identity=Identity("WanTransformer3DModel", "wan", 2), steps=6, ranges=[(0, 3), (3, 6)],
                scheme="w4a8", alpha=[None, 0.25], layers=layers, meta={"calibrated": "2026-12-03"})
    return Plan(**{**base, **kw})


def test_split_steps_closed_forms():
    assert split_steps(4, 2) == [(0, 2), (2, 4)]
    assert split_steps(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert split_steps(5, 1) == [(0, 5)]
    with pytest.raises(ConfigError, match="--ranges 6: need between 1 and the step count \\(5\\)"):
        split_steps(5, 6)


def test_plan_round_trips_through_json_and_maps_steps_to_ranges():
    plan = _plan()
    again = Plan.from_quantization_config(json.loads(json.dumps(plan.to_quantization_config())))
    assert again == plan
    assert [plan.range_of(t) for t in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match="covers steps 0..5, got step 6"):
        plan.range_of(6)
    # bytes: int8 codes + fp32 scales; packed int4 words + scales + fp32 divisors
    assert plan.layers["blocks.0.attn.to_q"].weight_bytes() == (8 * 16 + 4 * 8) + (8 * 2 * 4 + 4 * 8 + 4 * 16)
    assert plan.layers["blocks.0.ff.net.2"].weight_bytes() == 16 * 24 + 4 * 16


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.update(format="other"), "not a ViDiT-Q plan"),
    (lambda d: d.update(version=9), "version 9 is not supported"),
    (lambda d: d.update(quant_method="mbq"), "quant_method is 'mbq'"),
    (lambda d: d.update(scheme="w2a2"), "scheme 'w2a2'"),
    (lambda d: d.update(ranges=[[0, 3], [4, 6]]), "must be non-empty .* that tile 0..6"),
    (lambda d: d.update(alpha=[None]), "alpha lists 1 values for 2 timestep ranges"),
    (lambda d: d["layers"]["blocks.0.attn.to_q"].update(ranges=[0, 2]), r"variant index \(0..1\)"),
    (lambda d: d["layers"]["blocks.0.attn.to_q"].update(variants=[[3, False], [4, True]]), "bits must be 4 or 8"),
    (lambda d: d.pop("steps"), "needs model"),
])
def test_broken_plans_name_what_is_wrong(edit, msg):
    d = json.loads(json.dumps(_plan().to_quantization_config()))
    edit(d)
    with pytest.raises(ConfigError, match=msg):
        Plan.from_quantization_config(d, "x/config.json")


def test_model_and_step_checks():
    plan = _plan()
    shapes = {"blocks.0.attn.to_q": (16, 8, True), "blocks.0.ff.net.2": (24, 16, False)}
    plan.check_model("WanTransformer3DModel", 2, shapes, "ck")
    with pytest.raises(ConfigError, match="architecture='WanTransformer3DModel'.*has architecture='FluxTransformer2DModel'"):
        plan.check_model("FluxTransformer2DModel", 2, shapes, "ck")
    with pytest.raises(ConfigError, match="blocks=2, but this denoiser has blocks=3"):
        plan.check_model("WanTransformer3DModel", 3, shapes, "ck")
    with pytest.raises(ConfigError, match="'blocks.0.ff.net.2', which this WanTransformer3DModel has no linear"):
        plan.check_model("WanTransformer3DModel", 2, {"blocks.0.attn.to_q": (16, 8, True)}, "ck")
    with pytest.raises(ConfigError, match="steps=6, but this run has num_inference_steps=5"):
        plan.check_steps(5, 0, "ck")
    with pytest.raises(ConfigError, match="covers 6 steps, this run reached step 7"):
        plan.check_steps(None, 6, "ck")
    plan.check_steps(None, 5, "ck")


def test_smoothing_factors_and_weight_quantization_closed_forms():
    a = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_factors(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, (1e-5 ** 0.5) / 2 ** 0.5]))
    assert smoothing_factors(a, w, 1.0)[:2].tolist() == [4.0, 1.0]

    W = torch.tensor([[1.0, -2.0, 0.5], [0.25, 0.0, -0.125]])
    assert weight_channel_max(W).tolist() == [1.0, 2.0, 0.5]
    q, scale = quantize_weight(W, 8)
    torch.testing.assert_close(scale, torch.tensor([2 / 127, 0.25 / 127]))
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32], [127, 0, -64]]  # 63.5, 31.75 -> away from 0
    # balancing multiplies input channel k by s[k] before rounding
    sm = torch.tensor([2.0, 0.5, 4.0])
    q2, s2 = quantize_weight(W, 8, sm)
    q3, s3 = quantize_weight(W * sm, 8)
    assert torch.equal(q2, q3) and torch.equal(s2, s3)
    # 4 bits: codes in [-7, 7] stored +8, packed 8 per int32
    q4, s4 = quantize_weight(W, 4)
    assert q4.dtype == torch.int32 and q4.shape == (2, 1)
    codes = unpack_reference(q4, 4, 3).to(torch.int64) - 8
    assert s4.dtype == torch.float32 and torch.allclose(s4, torch.tensor([2 / 7, 0.25 / 7]))
    # codes are rounded against the stored fp32 scale (so W ~ codes * scale exactly as the kernel reads it):
    # fp32(2/7) > 2/7 puts 1.0 / scale just under the 3.5 tie
    assert codes.tolist() == [[3, -7, 2], [7, 0, -3]]


def test_quantized_layer_uses_the_variant_of_the_current_range():
    torch.manual_seed(0)
    lp = LayerPlan(16, 8, True, [Variant(8, False), Variant(4, True)], [0, 1])
    state = QuantState(_plan())
    layer = ViDiTQLinear("blocks.0.attn.to_q", lp, state)
    w, b = torch.randn(8, 16), torch.randn(8)
    sm = torch.rand(16) + 0.5
    for v, (bits, smooth) in enumerate(((8, None), (4, sm))):
        qw, ws = quantize_weight(w, bits, smooth)
        layer.variants[v].qweight.data, layer.variants[v].wscale.data = qw, ws
        if smooth is not None:
            layer.variants[v].smooth.data = smooth
    layer.bias.data = b
    x = torch.randn(5, 16)
    with pytest.raises(RuntimeError, match="ran outside a denoiser call"):
        layer(x)
    for r, (bits, smooth) in enumerate(((8, None), (4, sm))):
        state.range = r
        qmax = 127 if bits == 8 else 7
        ws = w.double() * (smooth.double() if smooth is not None else 1)
        deq = torch.clamp(torch.round(ws / (ws.abs().amax(1, keepdim=True) / qmax)), -qmax, qmax) \
            * (ws.abs().amax(1, keepdim=True) / qmax)
        xs = x.double() / (smooth.double() if smooth is not None else 1)
        sx = xs.abs().amax(1, keepdim=True) / 127
        want = (torch.round(xs / sx) * sx) @ deq.T + b.double()
        got = layer(x)
        assert relative_error([got], [want]) < 1e-10
    assert relative_error([layer(x)], [torch.nn.functional.linear(x, w, b)]) > 1e-6  # 4-bit really quantizes

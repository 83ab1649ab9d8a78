"""ViDiT-Q on real diffusers pipelines (tiny random-weight Flux, PixArt, Wan).

Reference: a float64 fake-quant model written here from the float denoiser and the plan (its
per-layer, per-range bits and channel-balancing divisors): weights quantized per output channel in
float64 by this file's own code, activations quantized per token in float64, the range taken from
the step index this file derives from the call order. Every denoiser call of the real quantized
pipeline is compared with it, so a wrong kernel, wrong scales or an ignored range boundary fails
(the test also checks that the wrong range's reference is far outside the tolerance).
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

import overdrive.diffusers as odd
from overdrive.config import ConfigError
from overdrive.testing import pipeline_inputs, tiny_pipeline
from overdrive.viditq.runtime import ViDiTQLinear, quantized_layers

STEPS = 4
SIZE = {"wan": dict(height=32, width=32)}
CALLS_PER_STEP = {"flux": 1, "pixart": 1, "wan": 2}  # Wan runs CFG as separate cond/uncond calls
# a plan whose two ranges differ in every layer: no balancing + 4/8-bit mix vs balancing
PLAN_OPTIONS = {"scheme": "w4a8", "ranges": 2, "alpha": [None, 0.5], "mixed_precision": 0.4}


def _inputs(family, **kw):
    return pipeline_inputs(family, num_inference_steps=kw.pop("steps", STEPS), output_type="latent",
                           **{**SIZE.get(family, {}), **kw})


def _run(pipe, family, **kw):
    return pipe(**_inputs(family, **kw))[0]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    cache = {}

    def get(family, **options):
        key = (family, json.dumps(options or PLAN_OPTIONS, sort_keys=True))
        if key not in cache:
            pipe = tiny_pipeline(family)
            base = _run(pipe, family)
            ckpt = odd.calibrate(pipe, "viditq", options or PLAN_OPTIONS, **_inputs(family))
            path = tmp_path_factory.mktemp(f"viditq-{family}") / "denoiser"
            ckpt.save(path)
            cache[key] = (pipe, base, ckpt, path)
        return cache[key]
    return get


# ------------------------------------------------------------------------- float64 reference
class FakeQuant64(torch.nn.Module):
    """float64 fake quantization of one layer, per range: ``(bits, smooth or None)``."""

    def __init__(self, linear, per_range, step):
        super().__init__()
        self.w = linear.weight.detach().double()
        self.b = linear.bias.detach().double() if linear.bias is not None else None
        self.per_range, self.step = per_range, step
        self.deq = []
        for bits, smooth in per_range:
            qmax = 127 if bits == 8 else 7
            ws = self.w * (smooth.double()[None, :] if smooth is not None else 1.0)
            scale = ws.abs().amax(1, keepdim=True) / qmax
            v = ws / scale
            self.deq.append(torch.clamp(torch.sign(v) * torch.floor(v.abs() + 0.5), -qmax, qmax) * scale)

    def forward(self, x):
        r = self.step["range"]
        smooth = self.per_range[r][1]
        xs = x.double() / (smooth.double() if smooth is not None else 1.0)
        sx = xs.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        v = xs / sx
        xq = torch.clamp(torch.sign(v) * torch.floor(v.abs() + 0.5), -127, 127) * sx
        y = xq @ self.deq[r].T
        return y + self.b if self.b is not None else y


def reference_denoiser(float_model, ckpt):
    """A float64 copy of ``float_model`` whose planned layers fake-quantize as the plan says."""
    ref = copy.deepcopy(float_model).double()
    step = {"range": None}
    for name, lp in ckpt.plan.layers.items():
        lin = ref.get_submodule(name)
        per_range = []
        for r in range(len(ckpt.plan.ranges)):
            v = lp.ranges[r]
            smooth = ckpt.tensors.get(f"{name}.variants.{v}.smooth")
            per_range.append((lp.variants[v].bits, smooth))
        parent, _, leaf = name.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, FakeQuant64(lin, per_range, step))
    return ref, step


def _to64(x):
    if torch.is_tensor(x):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to64(v) for k, v in x.items()}
    return x


def _captured_calls(pipe, family, **kw):
    """Run the pipeline, capturing each denoiser call's keyword inputs and prediction."""
    calls = []

    def hook(module, args, kwargs, out):
        kwargs = {**dict(zip(("hidden_states",), args)), **kwargs}
        calls.append(({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()},
                      (out[0] if isinstance(out, tuple) else out.sample).detach().clone()))
    h = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        latents = _run(pipe, family, **kw)
    finally:
        h.remove()
    return latents, calls


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# PixArt (the cheapest calibration) in the fast tier; Flux and Wan (CFG as two calls per step) in the slow one
FAMILIES = [pytest.param("flux", marks=pytest.mark.slow), "pixart", pytest.param("wan", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_denoiser_call_equals_the_float64_fake_quant_reference(calibrated, family):
    pipe, base, ckpt, path = calibrated(family)
    plan = ckpt.plan
    assert plan.ranges == [(0, 2), (2, 4)]
    # the two ranges really differ: balancing in range 1 only, some layers at 8 bits
    assert any(lp.ranges[0] != lp.ranges[1] for lp in plan.layers.values())
    assert {v.bits for lp in plan.layers.values() for v in lp.variants} == {4, 8}
    ref, step = reference_denoiser(pipe.transformer, ckpt)
    hooks = odd.enable(pipe, "viditq", checkpoint=str(path))
    try:
        latents, calls = _captured_calls(pipe, family)
    finally:
        odd.disable(pipe)
    per = CALLS_PER_STEP[family]
    assert len(calls) == STEPS * per
    assert hooks.calls_per_range == [2 * per, 2 * per]  # the switch happened at the boundary, step 2
    worst, wrong = 0.0, []
    with torch.no_grad():
        for i, (kwargs, out) in enumerate(calls):
            t = i // per
            r = 0 if t < 2 else 1
            step["range"] = r
            want = ref(**{**_to64(kwargs), "return_dict": False})[0]
            worst = max(worst, _rel(out, want))
            step["range"] = 1 - r  # the other range's weights and balancing: must be far off
            wrong.append(_rel(out, ref(**{**_to64(kwargs), "return_dict": False})[0]))
    assert worst < 2e-4, worst
    assert min(wrong) > 50 * max(worst, 1e-6), (min(wrong), worst)
    assert _rel(latents, base) > 10 * worst  # quantization changes the result measurably


@pytest.mark.slow
def test_triton_kernels_in_the_interpreter_give_the_same_pipeline(calibrated, monkeypatch):
    pipe, base, ckpt, path = calibrated("flux")
    odd.enable(pipe, "viditq", checkpoint=str(path))
    try:
        torch_out = _run(pipe, "flux")
        monkeypatch.setenv("OVERDRIVE_KERNELS", "interpret")
        interp = _run(pipe, "flux")
    finally:
        odd.disable(pipe)
    assert _rel(interp, torch_out) < 1e-4


def _state(model):
    mods = {n: (sorted(vars(m)), dict(m._modules)) for n, m in model.named_modules()}
    tensors = {n: (t, t.detach().clone()) for n, t in model.named_parameters()}
    return mods, tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_the_float_model_exactly(calibrated, family):
    pipe, base, ckpt, path = calibrated(family)
    before = _state(pipe.transformer)
    hooks = odd.enable(pipe, "viditq", checkpoint=str(path))
    assert set(quantized_layers(pipe.transformer)) == set(ckpt.plan.layers)
    quant = _run(pipe, family)
    assert not torch.equal(quant, base)
    assert odd.disable(pipe) and odd.enabled(pipe) is None
    hooks.detach()  # idempotent
    after = _state(pipe.transformer)
    assert after[0].keys() == before[0].keys()
    for n, (attrs, children) in before[0].items():
        assert after[0][n][0] == attrs and all(after[0][n][1][k] is c for k, c in children.items()), n
    for n, (t, val) in before[1].items():
        assert after[1][n][0] is t and torch.equal(t, val), n
    assert torch.equal(_run(pipe, family), base)


def test_wrong_model_wrong_steps_and_broken_checkpoints_are_clear_errors(calibrated, tmp_path):
    pipe, base, ckpt, path = calibrated("pixart")
    other = tiny_pipeline("flux")
    with pytest.raises(ConfigError, match="calibrated for architecture='PixArtTransformer2DModel'.*Flux"):
        odd.enable(other, "viditq", checkpoint=str(path))
    assert odd.enabled(other) is None and not quantized_layers(other.transformer)
    # another step count: rejected before the first step (the pipeline's scheduler gives it)
    hooks = odd.enable(pipe, "viditq", checkpoint=str(path))
    try:
        with pytest.raises(ConfigError, match=r"calibrated for steps=4, but this run has num_inference_steps=3"):
            _run(pipe, "pixart", steps=3)
        assert hooks.calls_per_range == [0, 0]
    finally:
        odd.disable(pipe)
    # a layer of another shape, a missing tensor, a foreign config
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    conf = json.loads((bad / "config.json").read_text())
    name = next(iter(conf["quantization_config"]["layers"]))
    conf["quantization_config"]["layers"][name]["in"] += 1
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=rf"layer '{name}' is \(in, out, bias\)"):
        odd.enable(pipe, "viditq", checkpoint=str(bad))
    from safetensors.torch import load_file, save_file

    shutil.rmtree(bad)
    shutil.copytree(path, bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(f))
    del tensors[f"{name}.variants.0.wscale"]
    save_file(tensors, str(f))
    with pytest.raises(ConfigError, match=rf"no tensor '{name}.variants.0.wscale'"):
        odd.enable(pipe, "viditq", checkpoint=str(bad))
    with pytest.raises(ConfigError, match="no config.json with a quantization_config"):
        odd.enable(pipe, "viditq", checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="has no ViDiT-Q-quantized layers; give checkpoint=DIR"):
        odd.enable(pipe, "viditq")
    assert odd.enabled(pipe) is None and not quantized_layers(pipe.transformer)
    assert torch.equal(_run(pipe, "pixart"), base)


def test_calibration_options_are_checked(calibrated):
    pipe = tiny_pipeline("flux")
    for options, msg in (({"scheme": "w2a8"}, "scheme must be one of"),
                         ({"scheme": "w8a8", "mixed_precision": 0.5}, "use scheme='w4a8'"),
                         ({"ranges": 9}, "--ranges 9: need between 1 and the step count"),
                         ({"alpha": [0.5]}, "a list of 2"),
                         ({"alpha": 1.5}, r"alpha values must be in \[0, 1\]"),
                         ({"rangez": 2}, "known: .*ranges")):
        with pytest.raises(ConfigError, match=msg):
            odd.calibrate(pipe, "viditq", options, **_inputs("flux"))


def test_one_range_is_a_single_weight_set(calibrated):
    pipe, base, ckpt, path = calibrated("flux", scheme="w8a8", ranges=1)
    plan = ckpt.plan
    assert plan.ranges == [(0, STEPS)] and plan.alpha == [None]
    assert all(len(lp.variants) == 1 and lp.variants[0] == type(lp.variants[0])(8, False) for lp in plan.layers.values())
    hooks = odd.enable(pipe, "viditq", checkpoint=str(path))
    try:
        out = _run(pipe, "flux")
    finally:
        odd.disable(pipe)
    assert hooks.calls_per_range == [STEPS]
    assert 0 < _rel(out, base) < 0.05


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
def test_cli_calibrate_then_from_pretrained_loads_int8_storage(tmp_path):
    """CLI -> pipeline directory -> DiffusionPipeline.from_pretrained (the registered quantizer) -> generate."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = tiny_pipeline("flux")
    pipe.save_pretrained(tmp_path / "pipe")
    inputs = _inputs("flux")
    save_file({k: v.contiguous() for k, v in inputs.items() if torch.is_tensor(v)}, str(tmp_path / "embeds.safetensors"))
    cmd = [sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "viditq", "--pipeline", str(tmp_path / "pipe"),
           "--embeds", str(tmp_path / "embeds.safetensors"), "--steps", str(STEPS), "--height", "16", "--width", "16",
           "--scheme", "w8a8", "--output", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "W8A8, 20 quantized linear layers" in r.stdout
    assert (tmp_path / "out" / "vae").is_dir() and (tmp_path / "out" / "model_index.json").is_file()
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # output exists: refused, untouched
    assert r2.returncode != 0 and "already exists" in r2.stderr

    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "out"), text_encoder=None, tokenizer=None,
                                               text_encoder_2=None, tokenizer_2=None)
    loaded.set_progress_bar_config(disable=True)
    tr = loaded.transformer
    layers = quantized_layers(tr)
    assert len(layers) == 20 and all(isinstance(m, ViDiTQLinear) for m in layers.values())
    q = next(iter(layers.values())).variants[0].qweight
    assert q.dtype == torch.int8 and not q.is_meta
    assert odd.enabled(loaded) == "viditq"  # the quantizer attached the hook layer
    # int8 storage: the quantized layers' weights take a quarter of their float32 bytes (+ scales)
    float_bytes = _param_bytes(pipe.transformer)
    quant_linear = sum(p.numel() * 4 for n, p in pipe.transformer.named_parameters()
                       if n.rsplit(".", 1)[0] in layers and n.endswith("weight"))
    assert _param_bytes(tr) <= float_bytes - quant_linear * 3 // 4 + sum(m.out_features * 4 for m in layers.values())

    out = _run(loaded, "flux")
    odd.enable(pipe, "viditq", checkpoint=str(tmp_path / "out"))  # the same checkpoint on the float pipeline
    try:
        via_enable = _run(pipe, "flux")
    finally:
        odd.disable(pipe)
    assert _rel(out, via_enable) < 1e-4
    # bind the pipeline: a wrong step count is then rejected before the first step
    hooks = odd.enable(loaded, "viditq")
    with pytest.raises(ConfigError, match="calibrated for steps=4, but this run has num_inference_steps=2"):
        _run(loaded, "flux", steps=2)
    assert hooks.calls_per_range == [0, 0]
    assert _rel(_run(loaded, "flux"), out) < 1e-6
    odd.disable(loaded)  # no float layers to return to: running it now is a clear error
    with pytest.raises(RuntimeError, match="ran outside a denoiser call with ViDiT-Q enabled"):
        _run(loaded, "flux")


@pytest.mark.slow
def test_from_pretrained_without_a_pipeline_rejects_a_shorter_run_at_its_end(tmp_path):
    pipe = tiny_pipeline("flux")
    ckpt = odd.calibrate(pipe, "viditq", {"scheme": "w8a8"}, **_inputs("flux"))
    ckpt.save(tmp_path / "denoiser")
    from diffusers import FluxTransformer2DModel

    pipe.transformer = FluxTransformer2DModel.from_pretrained(str(tmp_path / "denoiser"))
    assert odd.enabled(pipe) == "viditq"
    _run(pipe, "flux")
    with pytest.raises(ConfigError, match="ended after 3 steps, but the ViDiT-Q checkpoint was calibrated for steps=4"):
        _run(pipe, "flux", steps=3)
    with pytest.raises(ConfigError, match="covers 4 steps, this run reached step 5"):
        _run(pipe, "flux", steps=5)


def test_a_float32_checkpoint_runs_in_a_bfloat16_pipeline(calibrated):
    pipe, base, ckpt, path = calibrated("flux", scheme="w8a8", ranges=1)
    p16 = tiny_pipeline("flux", dtype=torch.bfloat16)
    hooks = odd.enable(p16, "viditq", checkpoint=str(path))
    try:
        inputs = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in _inputs("flux").items()}
        out = p16(**inputs)[0]
    finally:
        odd.disable(p16)
    layer = next(iter(hooks.layers.values()))
    assert out.dtype == torch.bfloat16 and layer.variants[0].wscale.dtype == torch.float32  # scales kept fp32
    assert hooks.calls_per_range == [STEPS] and _rel(out.float(), base) < 0.05

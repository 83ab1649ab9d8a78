"""DiTFastAttn on real diffusers pipelines (tiny random-weight Flux, SD3, PixArt, Wan).

References: the unaccelerated pipeline (bit-identical where nothing is compressed), closed forms
(AST/ASC FLOP fractions, WA-RS = full when the inputs repeat), a float64 masked-attention
reference written here for arrow attention, and the plan's own cost model vs. the runtime's counters.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import overdrive.diffusers as odd
from overdrive.config import ConfigError
from overdrive.ditfastattn.config import Plan, band_for
from overdrive.testing import pipeline_inputs, tiny_pipeline

STEPS = 4
SIZE = {"wan": dict(height=64, width=64)}  # 16x16 Wan frames are only 3 tokens
CFG = {"flux": None, "sd3": "batched", "pixart": "batched", "wan": "separate"}


def _inputs(family, **kw):
    return pipeline_inputs(family, num_inference_steps=kw.pop("steps", STEPS), **{**SIZE.get(family, {}), **kw})


def _run(pipe, family, **kw):
    out = pipe(**_inputs(family, **kw))
    return out.images if hasattr(out, "images") else out.frames if hasattr(out, "frames") else out[0]


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(family):
        if family not in cache:
            pipe = tiny_pipeline(family)
            cache[family] = (pipe, _run(pipe, family))
        return cache[family]
    return get


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "wan"])
def test_every_strategy_runs_and_disable_restores_identical_output(pipes, family):
    pipe, base = pipes(family)
    for strategy in ("full", "ast", "asc", "wars", "wars+asc", "arrow"):
        att = odd.enable(pipe, "ditfastattn", strategy=strategy)
        try:
            out = _run(pipe, family)
        finally:
            assert odd.disable(pipe)
        assert torch.isfinite(out).all(), strategy
        frac = att.flops_fraction
        if strategy == "full":
            assert torch.equal(out, base) and frac == 1.0
        elif strategy == "ast":  # warmup 1: step 0 computed, steps 1..3 reuse -> 1/4
            assert frac == pytest.approx(1 / STEPS, rel=1e-12) and att.reused["ast"] > 0
        elif strategy == "asc":  # one CFG half computed from step 1 on -> (1 + 3/2) / 4; no CFG -> untouched
            if CFG[family]:
                assert frac == pytest.approx((1 + (STEPS - 1) / 2) / STEPS, rel=1e-12)
            else:
                assert frac == 1.0 and torch.equal(out, base)
        else:
            assert frac < 1.0 and not torch.equal(out, base)
    assert odd.enabled(pipe) is None
    assert torch.equal(_run(pipe, family), base)


def _module_outputs(att):
    """Forward hooks (torch's, on the instances) recording every attention module output in call order."""
    seen = {b: [] for b in range(len(att.modules))}
    handles = [m.register_forward_hook(lambda mod, a, out, b=b: seen[b].append(out)) for b, m in enumerate(att.modules)]
    return seen, handles


def test_ast_reuses_exactly_the_cached_output(pipes):
    pipe, _ = pipes("flux")
    att = odd.enable(pipe, "ditfastattn", strategy="ast")
    seen, handles = _module_outputs(att)
    try:
        _run(pipe, "flux")
        for b, outs in seen.items():
            assert len(outs) == STEPS
            for t in range(1, STEPS):
                assert outs[t] is outs[0], (b, t)  # the very object computed at step 0
        # direct denoiser calls in a cache context: the attachment's cache, inspected between steps,
        # holds exactly what the next step returns
        kw = _flux_call_kwargs(torch.float32)
        for b in seen:
            seen[b].clear()
        with torch.no_grad():
            with pipe.transformer.cache_context("cond", step_index=0):
                pipe.transformer(**kw)
            cached = [att.runs["cond"].modules[b].out for b in seen]
            with pipe.transformer.cache_context("cond", step_index=1):
                pipe.transformer(**{**kw, "timestep": torch.tensor([0.3])})
        for b in seen:
            assert seen[b][1] is cached[b] and seen[b][0] is cached[b]
    finally:
        for h in handles:
            h.remove()
        odd.disable(pipe)


def test_asc_shares_between_cfg_halves_batched_and_separate(pipes):
    for family in ("sd3", "wan"):
        pipe, _ = pipes(family)
        att = odd.enable(pipe, "ditfastattn", strategy="asc")
        seen, handles = _module_outputs(att)
        try:
            _run(pipe, family)
        finally:
            for h in handles:
                h.remove()
            odd.disable(pipe)
        for b, outs in seen.items():
            if family == "sd3":  # one call per step, batch [uncond, cond]: both halves identical from step 1
                assert len(outs) == STEPS
                for t in range(STEPS):
                    for o in (outs[t] if isinstance(outs[t], tuple) else (outs[t],)):
                        halves_equal = torch.equal(o[:1], o[1:])
                        assert halves_equal == (t >= 1), (b, t)
            else:  # "cond" then "uncond" call per step: the uncond call returns the cond call's output
                assert len(outs) == 2 * STEPS
                for t in range(STEPS):
                    assert (outs[2 * t + 1] is outs[2 * t]) == (t >= 1), (b, t)


def test_asc_without_guidance_computes_everything(pipes):
    pipe, _ = pipes("sd3")
    base = _run(pipe, "sd3", guidance=False)
    att = odd.enable(pipe, "ditfastattn", strategy="wars+asc")
    try:
        out = _run(pipe, "sd3", guidance=False)
    finally:
        odd.disable(pipe)
    assert att.reused["asc"] == 0 and torch.isfinite(out).all()
    att = odd.enable(pipe, "ditfastattn", strategy="asc")
    try:
        assert torch.equal(_run(pipe, "sd3", guidance=False), base)
    finally:
        odd.disable(pipe)


@pytest.mark.parametrize("guidance", [True, False])
def test_batch_of_two_equals_two_single_runs(pipes, guidance):
    pipe, _ = pipes("sd3")
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    both = _inputs("sd3", batch=2, guidance=guidance, seed=5)
    outs = {}
    odd.enable(pipe, "ditfastattn", strategy="wars+asc" if guidance else "wars")
    try:
        outs["batch"] = pipe(**{**both, "latents": lat}).images
        for i in range(2):
            one = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 2 else v) for k, v in both.items()}
            outs[i] = pipe(**{**one, "latents": lat[i:i + 1]}).images
    finally:
        odd.disable(pipe)
    for i in range(2):
        torch.testing.assert_close(outs["batch"][i:i + 1], outs[i], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outs[0], outs[1])


def _flux_call_kwargs(dtype):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 64, 4, generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g, dtype=dtype),
                pooled_projections=torch.randn(1, 32, generator=g, dtype=dtype),
                timestep=torch.tensor([0.7], dtype=dtype),
                txt_ids=torch.zeros(12, 3), img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.),
                                                                              torch.arange(8.), indexing="ij"), -1).reshape(64, 3),
                return_dict=False)


class _MaskedAttention(TorchFunctionMode):
    """Test reference: every SDPA call becomes float64 attention under an explicit arrow mask."""

    def __init__(self, band: int, text: int):
        super().__init__()
        self.band, self.text = band, text

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        a = dict(zip(("query", "key", "value"), args), **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        assert a.get("attn_mask") is None and not a.get("is_causal")
        s, d = q.shape[-2], q.shape[-1]
        scale = a.get("scale") or d ** -0.5
        i = torch.arange(s)
        is_text = i < self.text  # Flux: text first
        vis = i - self.text
        allowed = is_text[:, None] | is_text[None, :] | ((vis[:, None] - vis[None, :]).abs() <= self.band)
        scores = (q.double() @ k.double().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ v.double()).to(q.dtype)


def test_wars_and_arrow_against_float64_references():
    pipe = tiny_pipeline("flux", dtype=torch.float64)
    tr = pipe.transformer
    kw = _flux_call_kwargs(torch.float64)
    with torch.no_grad():
        full = tr(**kw)[0]
        # WA-RS: step 1 = window(step-1 inputs) + (full - window)(step-0 inputs): identical inputs -> full
        odd.enable(tr, "ditfastattn", strategy="wars", window_fraction=0.125)
        try:
            for step in range(2):
                with tr.cache_context("cond", step_index=step):
                    out = tr(**kw)[0]
                assert (out - full).abs().max() < 1e-10, step
        finally:
            odd.disable(tr)
        # arrow: text rows/columns full, vision-vision band ceil(64 / 2k), vs. the masked reference
        for k in (8, 16):
            att = odd.enable(tr, "ditfastattn", strategy="arrow", arrow_k=k)
            try:
                for step in range(2):
                    with tr.cache_context("cond", step_index=step):
                        out = tr(**kw)[0]
            finally:
                odd.disable(tr)
            with _MaskedAttention(band_for(k, 64), text=12):
                ref = tr(**kw)[0]
            assert (out - ref).abs().max() < 1e-10
            assert (out - full).abs().max() > 1e-6  # the band really dropped pairs
            assert att.flops_fraction < 1


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "wan"])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_calibrate_enable_generate(pipes, tmp_path, family, variant):
    pipe, base = pipes(family)
    plan = odd.calibrate(pipe, "ditfastattn", dict(variant=variant, threshold=0.1, alpha=0.5),
                         **_inputs(family, output_type="latent"))
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    ident = plan.identity
    assert (ident.architecture, ident.steps, ident.blocks) == (type(pipe.transformer).__name__, STEPS, len(
        odd.denoiser_info(pipe.transformer).blocks(pipe.transformer)))
    att = odd.enable(pipe, "ditfastattn", plan=str(path))
    try:
        out = _run(pipe, family)
    finally:
        odd.disable(pipe)
    assert torch.isfinite(out).all()
    # the runtime's FLOP counters agree with the plan's cost model (two independent computations)
    assert att.flops_fraction == pytest.approx(plan.meta["predicted_attention_flops_fraction"], abs=1e-6)
    assert att.flops_fraction < 1.0
    assert float((out - base).norm() / base.norm()) < 0.5
    assert torch.equal(_run(pipe, family), base)


def test_all_full_plan_reproduces_the_pipeline_exactly(pipes, tmp_path):
    for family in ("sd3", "wan"):
        pipe, base = pipes(family)
        plan = odd.calibrate(pipe, "ditfastattn", dict(variant="v1", threshold=0.1),
                             **_inputs(family, output_type="latent"))
        d = plan.to_dict()
        d["steps"] = [["full"] * plan.identity.blocks for _ in d["steps"]]
        (tmp_path / "full.json").write_text(json.dumps(d))
        att = odd.enable(pipe, "ditfastattn", plan=str(tmp_path / "full.json"))
        try:
            assert torch.equal(_run(pipe, family), base)
        finally:
            odd.disable(pipe)
        assert att.flops_fraction == 1.0


def test_mismatched_plans_fail_with_the_field_named(pipes, tmp_path):
    pipe, _ = pipes("flux")
    plan = odd.calibrate(pipe, "ditfastattn", dict(variant="v1", threshold=0.1),
                         **_inputs("flux", output_type="latent"))
    path = plan.save(tmp_path / "flux.json")
    for kwargs, match in ((dict(height=32, width=32), r"vision_tokens=64, but this model/call has vision_tokens=256"),
                          (dict(steps=3), r"steps=4, but this run has num_inference_steps=3")):
        odd.enable(pipe, "ditfastattn", plan=str(path))
        try:
            with pytest.raises(ConfigError, match=match):
                _run(pipe, "flux", **kwargs)
        finally:
            odd.disable(pipe)
    sd3, _ = pipes("sd3")
    with pytest.raises(ConfigError, match="calibrated for architecture=FluxTransformer2DModel, but this denoiser has "
                                          "architecture=SD3Transformer2DModel"):
        odd.enable(sd3, "ditfastattn", plan=str(path))
    d = json.loads(path.read_text())
    d["model"]["heads"] = 3
    (tmp_path / "heads.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="expected 3 per-head codes|heads=3, but this denoiser has heads=2"):
        odd.enable(pipe, "ditfastattn", plan=str(tmp_path / "heads.json"))
    assert odd.enabled(pipe) is None and odd.enabled(sd3) is None


def test_unsupported_models_list_the_supported_ones():
    with pytest.raises(TypeError, match="not a known DiT denoiser; known: CogVideoXTransformer3DModel, "
                                        "FluxTransformer2DModel, HunyuanVideoTransformer3DModel, "
                                        "PixArtTransformer2DModel"):
        odd.enable(torch.nn.Linear(2, 2), "ditfastattn", strategy="ast")
    with pytest.raises(ConfigError, match="give plan=PATH"):
        odd.enable(tiny_pipeline("flux"), "ditfastattn")


@pytest.mark.slow  # ~55 s: saves a pipeline, calibrates v1 and v2 through the CLI
def test_cli_calibrates_a_saved_pipeline(tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = tiny_pipeline("sd3")
    pipe.save_pretrained(tmp_path / "pipe")
    inputs = _inputs("sd3")
    embeds = {k: v.contiguous() for k, v in inputs.items() if torch.is_tensor(v)}
    save_file(embeds, str(tmp_path / "embeds.safetensors"))
    cmd = [sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "ditfastattn", "--pipeline",
           str(tmp_path / "pipe"), "--embeds", str(tmp_path / "embeds.safetensors"), "--steps", str(STEPS),
           "--height", "16", "--width", "16", "--variant", "v2", "--alpha", "0.5", "--output", str(tmp_path / "plan.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and "SD3Transformer2DModel" in r.stdout
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.variant == "v2" and plan.identity.vision_tokens == 256 and plan.identity.text_tokens == 12
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", text_encoder=None, text_encoder_2=None,
                                               text_encoder_3=None, tokenizer=None, tokenizer_2=None, tokenizer_3=None)
    loaded.set_progress_bar_config(disable=True)
    att = odd.enable(loaded, "ditfastattn", plan=str(tmp_path / "plan.json"))
    out = loaded(**inputs).images
    assert torch.isfinite(out).all()
    assert att.flops_fraction == pytest.approx(plan.meta["predicted_attention_flops_fraction"], abs=1e-6)
    # bad input: named file / option, exit code 2, nothing written
    bad = [(["--pipeline", str(tmp_path / "nope")], "no model_index.json"),
           (["--embeds", str(tmp_path / "missing.safetensors")], "missing.safetensors: no such file")]
    save_file({"prompt_embedz": embeds["prompt_embeds"]}, str(tmp_path / "wrong.safetensors"))
    bad.append((["--embeds", str(tmp_path / "wrong.safetensors")], r"\['prompt_embedz'\] are not arguments"))
    for swap, match in bad:
        c = list(cmd)
        c[c.index(swap[0]) + 1] = swap[1]
        c[c.index("--output") + 1] = str(tmp_path / "bad.json")
        r = subprocess.run(c, capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr[-2000:]
        import re
        assert re.search(match, r.stderr), r.stderr[-2000:]
        assert not (tmp_path / "bad.json").exists()


def test_cogvideox_denoiser_text_first_layout_and_closed_forms():
    """CogVideoX (batched CFG in one "cond_uncond" context, text tokens first) at the denoiser level."""
    import diffusers

    torch.manual_seed(0)
    tr = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=12, temporal_compression_ratio=4).eval().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 8, 8, generator=g, dtype=torch.float64).repeat(2, 1, 1, 1, 1)  # CFG: equal halves
    enc = torch.randn(2, 12, 32, generator=g, dtype=torch.float64)

    def run(times=(900, 600, 300, 100)):
        outs = []
        with torch.no_grad():
            for t in times:
                with tr.cache_context("cond_uncond"):
                    outs.append(tr(hidden_states=x, encoder_hidden_states=enc, timestep=torch.tensor([t, t]),
                                   return_dict=False)[0])
        return torch.stack(outs)

    base = run()
    for strategy, frac in (("full", 1.0), ("ast", 0.25), ("asc", 0.625)):
        att = odd.enable(tr, "ditfastattn", strategy=strategy)
        try:
            out = run()
        finally:
            odd.disable(tr)
        assert att.flops_fraction == pytest.approx(frac, rel=1e-12)
        assert att.geometry == (32, 12)  # 2 latent frames x 4 x 4 patches, 12 text tokens
        assert torch.equal(out, base) == (strategy == "full")
    # arrow at step 1 (no step_index in this context: a lower timestep is the next step) equals the
    # masked float64 reference at that timestep
    att = odd.enable(tr, "ditfastattn", strategy="arrow", arrow_k=8)
    try:
        out = run((900, 600))[1]
    finally:
        odd.disable(tr)
    with torch.no_grad(), _MaskedAttention(band_for(8, 32), text=12):
        ref = tr(hidden_states=x, encoder_hidden_states=enc, timestep=torch.tensor([600, 600]), return_dict=False)[0]
    assert (out - ref).abs().max() < 1e-10 and (out - base[1]).abs().max() > 1e-6
    assert torch.equal(run(), base)

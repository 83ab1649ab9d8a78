"""The diffusers hook layer (adapters/diffusers/hooks.py) on real tiny diffusers pipelines.

References: the pipelines' own schedulers (timesteps, step counts), the unaccelerated pipeline
(bit-identical outputs), torch's own forward pre-hooks (per-block argument rewriting), the module
attributes and parameters captured before attaching (exact restore), and closed forms (calls per step).
"""
from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import overdrive
import overdrive.diffusers as odd
from overdrive.adapters.diffusers.hooks import PipelineCalibration, Session
from overdrive.contracts import DiTHooks
from overdrive.testing.diffusion import assert_same_module_state, module_state, pipeline_inputs, tiny_pipeline

STEPS = 3
FAMILIES = ("flux", "sd3", "pixart", "wan", "hunyuanvideo")
# per family: CFG branches, batched CFG, text in the joint attention, timestep scale, and whether
# diffusers ends the runs at the end of each pipeline call (reset_state). SD3's and PixArt's
# transformers are no CacheMixin: no cache_context, no reset; the timestep rule alone ends their runs.
EXPECT = {
    "flux": dict(branches={"cond"}, batched=False, text=12, scale=1e-3, resets=True),  # FluxPipeline passes t / 1000
    "sd3": dict(branches={"default"}, batched=True, text=12, scale=1.0, resets=False),
    "pixart": dict(branches={"default"}, batched=True, text=0, scale=1.0, resets=False),
    "wan": dict(branches={"cond", "uncond"}, batched=False, text=0, scale=1.0, resets=True),
    "hunyuanvideo": dict(branches={"cond"}, batched=False, text=12, scale=1.0, resets=True),  # embedded guidance
}


def _run(pipe, family, **kw):
    out = pipe(**pipeline_inputs(family, num_inference_steps=kw.pop("steps", STEPS), output_type="latent", **kw))
    return out.images if hasattr(out, "images") else out.frames if hasattr(out, "frames") else out[0]


class Steps(DiTHooks):
    """Records the step context of every denoiser call; hooks nothing else."""

    def __init__(self, session):
        super().__init__(session)
        self.steps, self.resets = [], 0

    def denoiser_call(self, step, call):
        self.steps.append(step)
        return call.run()

    def reset_caches(self):
        self.resets += 1


class Everything(Steps):
    """Hooks every level and passes everything through unchanged, recording what it was handed."""

    def __init__(self, session):
        super().__init__(session)
        self.blocks, self.modules, self.ops = [], [], []

    def block_call(self, step, block, call):
        self.blocks.append((step, block))
        return call.run()

    def attention_call(self, step, block, call):
        self.modules.append((step, block))
        return call.run()

    def attention(self, step, block, op):
        self.ops.append((step, block, tuple(op.query.shape), op.text))
        return op.compute()


def _attach(pipe, hooks_cls, name="probe"):
    model = odd.denoiser_of(pipe)
    session = Session(name, model, odd.denoiser_info(model), None if isinstance(pipe, torch.nn.Module) else pipe)
    return session.install(hooks_cls(session))


@pytest.mark.parametrize("family", FAMILIES)
def test_step_context_follows_the_scheduler_across_runs(pipes, family):
    pipe, want = pipes(family), EXPECT[family]
    hooks = _attach(pipe, Steps)
    try:
        _run(pipe, family)
        _run(pipe, family)
        timesteps = [float(t) for t in pipe.scheduler.timesteps]  # the reference: the scheduler's own
    finally:
        hooks.detach()
    assert len(timesteps) == STEPS
    assert {s.branch for s in hooks.steps} == want["branches"]
    for branch in want["branches"]:
        mine = [s for s in hooks.steps if s.branch == branch]
        assert [s.step for s in mine] == list(range(STEPS)) * 2
        assert [s.new_run for s in mine] == [s.step == 0 for s in mine]
        assert [s.timestep for s in mine] == pytest.approx([t * want["scale"] for t in timesteps] * 2, rel=1e-6)
        assert all(s.num_steps == STEPS for s in mine)
    assert all(s.cfg_batched == want["batched"] and s.batch == (2 if want["batched"] else 1) for s in hooks.steps)
    assert all(s.text_tokens == want["text"] for s in hooks.steps)
    assert hooks.resets == (2 if want["resets"] else 0)


def test_without_guidance_there_is_one_unbatched_branch(pipes):
    pipe = pipes("sd3")
    hooks = _attach(pipe, Steps)
    try:
        _run(pipe, "sd3", guidance=False)
    finally:
        hooks.detach()
    assert [(s.branch, s.step, s.batch, s.cfg_batched) for s in hooks.steps] == \
        [("default", t, 1, False) for t in range(STEPS)]


def test_a_repeated_latent_without_guidance_is_not_taken_for_a_cfg_pair(pipes):
    """Two prompts on one latent, guidance off: identical latent halves, but the pipeline says no CFG."""
    pipe = pipes("sd3")
    hooks = _attach(pipe, Steps)
    latents = torch.randn(1, pipe.transformer.config.in_channels, 16 // pipe.vae_scale_factor,
                          16 // pipe.vae_scale_factor, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    try:
        _run(pipe, "sd3", batch=2, guidance=False, latents=latents)
        first = [(s.batch, s.cfg_batched) for s in hooks.steps]
        hooks.steps.clear()
        _run(pipe, "sd3", batch=1, latents=latents[:1])  # guidance on: the pipeline doubles the batch itself
    finally:
        hooks.detach()
    assert first == [(2, False)] * STEPS
    assert [(s.batch, s.cfg_batched) for s in hooks.steps] == [(2, True)] * STEPS


def _flux_kwargs(t, batch=1):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 64, 4, generator=g), encoder_hidden_states=torch.randn(batch, 12, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), t),
                txt_ids=torch.zeros(12, 3),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.), torch.arange(8.), indexing="ij"),
                                    -1).reshape(64, 3), return_dict=False)


def test_direct_calls_one_rule_for_runs_and_steps(pipes):
    tr = pipes("flux").transformer
    hooks = _attach(tr, Steps)
    try:
        with torch.no_grad():
            # no cache context: the next step while the timestep falls, a new run when it does not
            for t in (0.9, 0.6, 0.3, 0.9, 0.5, 0.5):
                tr(**_flux_kwargs(t))
            got = [(s.branch, s.step, s.new_run) for s in hooks.steps]
            assert got == [("default", 0, True), ("default", 1, False), ("default", 2, False),
                           ("default", 0, True), ("default", 1, False), ("default", 0, True)]
            assert all(s.num_steps is None for s in hooks.steps)  # no pipeline, no context: unknown
            # a context with step_index: that is the step; step_index 0 starts a run; branches are separate
            hooks.steps.clear()
            for name, i, n in (("cond", 0, 5), ("uncond", 0, 5), ("cond", 1, 5), ("uncond", 1, 5), ("cond", 0, 7)):
                with tr.cache_context(name, step_index=i, num_inference_steps=n):
                    tr(**_flux_kwargs(0.5))
            assert [(s.branch, s.step, s.new_run, s.num_steps) for s in hooks.steps] == [
                ("cond", 0, True, 5), ("uncond", 0, True, 5), ("cond", 1, False, 5), ("uncond", 1, False, 5),
                ("cond", 0, True, 7)]
            # reset() ends every run: the next call starts one even though its timestep is lower
            hooks.steps.clear()
            tr(**_flux_kwargs(0.9))
            hooks.reset()
            tr(**_flux_kwargs(0.1))
            assert [(s.step, s.new_run) for s in hooks.steps] == [(0, True), (0, True)]
            # batched CFG is seen from identical latent halves
            hooks.steps.clear()
            kw = _flux_kwargs(0.9, batch=2)
            tr(**kw)
            tr(**{**kw, "hidden_states": kw["hidden_states"][:1].repeat(2, 1, 1), "timestep": torch.full((2,), 0.8)})
            assert [s.cfg_batched for s in hooks.steps] == [False, True]
    finally:
        hooks.detach()


def test_any_module_inside_the_denoiser_reads_the_step(pipes):
    """What a timestep-aware quantized linear (ViDiT-Q) needs: the step while it runs."""
    pipe = pipes("wan")
    hooks = _attach(pipe, Steps)
    seen = []
    linear = pipe.transformer.blocks[1].ffn.net[2]  # a plain nn.Linear deep inside the denoiser
    handle = linear.register_forward_pre_hook(lambda m, a: seen.append(hooks.session.current))
    try:
        _run(pipe, "wan")
    finally:
        handle.remove()
        hooks.detach()
    assert isinstance(linear, torch.nn.Linear)
    assert len(seen) == len(hooks.steps) == 2 * STEPS
    assert all(a is b for a, b in zip(seen, hooks.steps))  # the very context of the enclosing call
    assert hooks.session.current is None


@pytest.mark.parametrize("family", FAMILIES)
def test_every_level_hooked_and_passed_through_is_bit_identical(pipes, family):
    pipe = pipes(family)
    base = _run(pipe, family)
    hooks = _attach(pipe, Everything)
    try:
        out = _run(pipe, family)
    finally:
        hooks.detach()
    assert torch.equal(out, base)
    n_blocks = len(hooks.session.blocks)
    calls = len(hooks.steps)
    assert calls == STEPS * len(EXPECT[family]["branches"])
    assert len(hooks.blocks) == len(hooks.modules) == len(hooks.ops) == calls * n_blocks
    assert [b for _, b in hooks.blocks] == list(range(n_blocks)) * calls
    info = odd.denoiser_info(pipe.transformer)
    text = EXPECT[family]["text"]
    for step, block, (b, h, s, d), span in hooks.ops:
        assert (h, d) == (hooks.session.heads, hooks.session.head_dim)
        # joint attention: where the text sits in the sequence, per model (text first: Flux; last: SD3)
        expected = (0, 0) if not text else (0, text) if info.text_first else (s - text, s)
        assert span == expected, (family, span, s)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_detach_restores_the_model_exactly(family):
    pipe = tiny_pipeline(family)
    tr = pipe.transformer
    fresh = module_state(tr)
    hooks = _attach(pipe, Everything)
    hooks.detach()
    assert_same_module_state(fresh, module_state(tr))  # never run: not even a hook registry is left behind
    assert not any("_diffusers_hook" in vars(m) for m in tr.modules())
    base = _run(pipe, family)  # the pipeline's own cache_context now gives the denoiser a registry
    before = module_state(tr)
    hooks = _attach(pipe, Everything)
    out = _run(pipe, family)
    assert odd.enabled(pipe) == "probe"
    hooks.detach()
    hooks.detach()  # idempotent
    assert odd.enabled(pipe) is None
    assert_same_module_state(before, module_state(tr))
    assert torch.equal(out, base) and torch.equal(_run(pipe, family), base)


class _Count(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_a_users_own_diffusers_hooks_survive_attach_and_detach(pipes):
    pipe = pipes("flux")
    tr = pipe.transformer
    base = _run(pipe, "flux")
    attn = tr.transformer_blocks[0].attn
    mine = _Count()
    HookRegistry.check_if_exists_or_initialize(attn).register_hook(mine, "users_counter")
    try:
        before = module_state(tr)
        hooks = _attach(pipe, Everything)
        out = _run(pipe, "flux")
        hooks.detach()
        assert mine.calls == STEPS  # called under the layer's hook too
        assert_same_module_state(before, module_state(tr))
        assert torch.equal(out, base) and torch.equal(_run(pipe, "flux"), base)
        assert mine.calls == 2 * STEPS
    finally:
        HookRegistry.check_if_exists_or_initialize(attn).remove_hook("users_counter", recurse=False)


class RotateBlockPositions(Steps):
    """VGDFR-style per-block positions: block 1 gets different rotary positions (rows rolled by one)."""

    def block_call(self, step, block, call):
        if block != 1:
            return call.run()
        return call.run_with(*call.args, **{**call.kwargs, "image_rotary_emb": _rolled(call.kwargs["image_rotary_emb"])})


def _rolled(rope):
    return tuple(r.roll(1, dims=0) for r in rope)


def test_per_block_argument_rewriting_equals_torch_pre_hook(pipes):
    pipe = pipes("flux")
    tr = pipe.transformer
    base = _run(pipe, "flux")
    hooks = _attach(pipe, RotateBlockPositions)
    try:
        mine = _run(pipe, "flux")
    finally:
        hooks.detach()
    # reference: the same rewrite through torch's own forward pre-hook on the same block
    handle = odd.denoiser_info(tr).blocks(tr)[1].register_forward_pre_hook(
        lambda m, a, kw: (a, {**kw, "image_rotary_emb": _rolled(kw["image_rotary_emb"])}), with_kwargs=True)
    try:
        ref = _run(pipe, "flux")
    finally:
        handle.remove()
    assert torch.equal(mine, ref) and not torch.equal(mine, base)


class AtFrames(DiTHooks):
    """Runs every block with its frames at the positions in ``self.positions`` (per-block RoPE)."""

    positions: list[int] = []

    def block_call(self, step, block, call):
        return self.session.run_at_frames(call, self.positions)


class _RestrictKeys(torch.overrides.TorchFunctionMode):
    """Self-attention over ``n`` tokens attends only to the ``allowed`` ones (a boolean key mask)."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            a = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
            if a["key"].shape[-2] == self.allowed.numel():
                assert a.get("attn_mask") is None
                a["attn_mask"] = self.allowed.view(1, 1, 1, -1)
            return func(**a)
        return func(*args, **kwargs)


def test_frame_positions_equal_the_full_latent_with_attention_limited_to_those_frames(pipes):
    # Wan mixes tokens only in self-attention (per-frame patches, per-token norms and projections), so a
    # latent holding only some frames, run at those frames' original positions, must give what the full
    # latent gives at those frames when its self-attention sees only them.
    tr = pipes("wan").transformer
    g = torch.Generator().manual_seed(0)
    frames, keep, per_frame = 7, [0, 2, 3, 6], 4  # a 4 x 4 latent = 2 x 2 tokens per frame
    full = torch.randn(1, 16, frames, 4, 4, generator=g)
    kw = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
              return_dict=False)
    allowed = torch.zeros(frames * per_frame, dtype=torch.bool)
    for f in keep:
        allowed[f * per_frame:(f + 1) * per_frame] = True
    with torch.no_grad():
        with _RestrictKeys(allowed):
            ref = tr(hidden_states=full, **kw)[0][:, :, keep]
        compact = tr(hidden_states=full[:, :, keep], **kw)[0]  # positions 0..3: not the same
        hooks = _attach(tr, AtFrames)
        hooks.positions = keep
        try:
            got = tr(hidden_states=full[:, :, keep], **kw)[0]
        finally:
            hooks.detach()
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(compact, ref, atol=1e-3)


def test_hunyuanvideo_blocks_get_the_rotary_of_the_given_frames(pipes):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pipe = pipes("hunyuanvideo")
    tr = pipe.transformer
    seen = []
    handles = [b.attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["image_rotary_emb"]), with_kwargs=True)
               for b in odd.denoiser_info(tr).blocks(tr)]
    hooks = _attach(pipe, AtFrames)
    hooks.positions = [0, 1, 3, 5, 7, 8]
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            tr(hidden_states=torch.randn(1, 4, 6, 2, 3, generator=g), timestep=torch.tensor([500.0]),
               encoder_hidden_states=torch.randn(1, 12, 16, generator=g),
               encoder_attention_mask=torch.ones(1, 12, dtype=torch.long),
               pooled_projections=torch.randn(1, 8, generator=g), guidance=torch.tensor([6000.0]))
    finally:
        hooks.detach()
        for h in handles:
            h.remove()
    # closed form: HunyuanVideo's rotary axes (time, row, column) on the grid of the given frames
    grid = torch.meshgrid(torch.tensor(hooks.positions, dtype=torch.float32), torch.arange(2.0), torch.arange(3.0),
                          indexing="ij")
    axes = [get_1d_rotary_pos_embed(d, x.reshape(-1), tr.config.rope_theta, use_real=True)
            for d, x in zip(tr.config.rope_axes_dim, grid)]
    want = (torch.cat([a[0] for a in axes], 1), torch.cat([a[1] for a in axes], 1))
    assert len(seen) == 2 and all(torch.allclose(s[0], want[0]) and torch.allclose(s[1], want[1]) for s in seen)


def test_frame_positions_need_rotary_metadata(pipes):
    hooks = _attach(pipes("flux"), AtFrames)
    try:
        with pytest.raises(TypeError, match="per-block frame positions need rotary metadata"):
            _run(pipes("flux"), "flux")
    finally:
        hooks.detach()


class _Twice:
    """A processor that runs the attention twice (as a non-native backend or a custom one might)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, *args, **kwargs):
        self.inner(attn, *args, **kwargs)
        return self.inner(attn, *args, **kwargs)


def test_an_attention_module_that_is_not_one_sdpa_call_is_a_clear_error(pipes):
    pipe = pipes("flux")
    attn = pipe.transformer.transformer_blocks[0].attn
    original = attn.processor
    attn.processor = _Twice(original)
    hooks = _attach(pipe, Everything)
    try:
        with pytest.raises(RuntimeError, match=r"probe: attention module 0 \(FluxAttention\) made 2 calls to "
                                               r"scaled_dot_product_attention; .*native attention backend"):
            _run(pipe, "flux")
    finally:
        hooks.detach()
        attn.processor = original


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_recording_groups_calls_by_step_and_replay_keeps_the_recorded_context(pipes, family):
    pipe = pipes(family)
    branches = EXPECT[family]["branches"]
    model = pipe.transformer
    run = PipelineCalibration("probe", pipe, model, odd.denoiser_info(model),
                              pipeline_inputs(family, num_inference_steps=STEPS, output_type="latent"))
    steps = run.record()
    assert odd.enabled(pipe) is None  # recording leaves nothing attached
    assert [[c.step.step for c in calls] for calls in steps] == [[t] * len(branches) for t in range(STEPS)]
    assert all({c.step.branch for c in calls} == branches for calls in steps)
    # replaying without hooks reproduces the recorded outputs exactly (same inputs, same context)
    for calls in steps:
        for c, out in zip(calls, run.replay(calls)):
            assert torch.equal(out, c.output)
    # with hooks attached, replays get the recorded step contexts as they are, in any order and
    # repeatedly (a calibrator tries several candidates on the same step)
    hooks = run.attach(Steps)
    try:
        order = [c for t in (1, 1, 0, 2) for c in steps[t]]
        run.replay(order)
        assert hooks.steps == [c.step for c in order]
    finally:
        run.close()
    assert odd.enabled(pipe) is None


def test_calibration_errors_name_the_method_and_options(pipes, example_registry):
    pipe = pipes("flux")
    with pytest.raises(overdrive.ConfigError, match="method 'example_stepcache' has no calibration"):
        odd.calibrate(pipe, "example_stepcache", num_inference_steps=2)
    with pytest.raises(overdrive.ConfigError, match=r"ditfastattn calibration options: .*'nope'.*; known: variant, "
                                                    r"threshold, alpha, window_fraction"):
        odd.calibrate(pipe, "ditfastattn", {"nope": 1}, num_inference_steps=2)
    with pytest.raises(TypeError, match="pass the diffusers pipeline, not its transformer"):
        odd.calibrate(pipe.transformer, "ditfastattn")
    hooks = odd.enable(pipe, "example_stepcache")
    try:
        with pytest.raises(overdrive.ConfigError, match="'example_stepcache' is enabled on this pipeline; disable"):
            odd.calibrate(pipe, "ditfastattn", num_inference_steps=2)
        with pytest.raises(RuntimeError, match="already enabled"):
            _attach(pipe, Steps)
    finally:
        hooks.detach()
    assert odd.enabled(pipe) is None


def test_no_global_state_keeps_a_model_alive():
    import gc
    import weakref

    pipe = tiny_pipeline("flux")
    hooks = _attach(pipe, Everything)
    _run(pipe, "flux")
    model = weakref.ref(pipe.transformer)
    del pipe, hooks
    gc.collect()
    assert model() is None  # the session lives in the model's own hook registry, nowhere else

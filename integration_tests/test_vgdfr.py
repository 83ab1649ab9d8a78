"""VGDFR on real tiny diffusers video pipelines (Wan, HunyuanVideo), and DLFR-VAE on the real Wan VAE.

References: the unmodified pipeline (bit-exact identities), a hand-written guided Euler loop on the
bare transformer with rotary tables built from Wan's own frequency buffers and frame restoration by
``numpy.interp`` (the whole VGDFR run, independently), closed-form schedules of videos with a static
half, and exact restore after disable.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import overdrive.diffusers as odd
from overdrive.config import ConfigError
from overdrive.contracts import DiTHooks
from overdrive.contracts.frame_rate import FrameRateSchedule
from overdrive.testing.diffusion import assert_same_module_state, module_state, pipeline_inputs, tiny_pipeline
from overdrive.vgdfr import dlfr

STEPS = 4
SIZE = 16       # 2 x 2 latent, one token per frame after Wan's (1, 2, 2) patches
FRAMES = 33     # 9 latent frames


def call(family="wan", **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipeline_inputs(family, num_frames=FRAMES, height=SIZE, width=SIZE, **kw)


def frames(out):
    return out.frames if hasattr(out, "frames") else out[0]


# ---------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_keep_ratio_one_is_the_unmodified_pipeline_and_disable_restores_exactly(pipes, family):
    pipe = pipes(family)
    ref = frames(pipe(**call(family)))  # the pipeline's own cache_context gives the denoiser a hook registry
    before = module_state(pipe.transformer)
    vg = odd.enable(pipe, "vgdfr", keep_ratio=1.0)
    try:
        assert torch.equal(frames(vg(**call(family))), ref)
        assert vg.schedule.is_identity and vg.schedule.latent_frames == 9
        assert odd.enabled(pipe) == "vgdfr"
    finally:
        odd.disable(pipe)
    assert odd.enabled(pipe) is None
    assert_same_module_state(before, module_state(pipe.transformer))
    assert torch.equal(frames(pipe(**call(family))), ref)


@pytest.mark.parametrize("output_type", ["pt", pytest.param("np", marks=pytest.mark.slow),
                                         pytest.param("pil", marks=pytest.mark.slow)])
def test_a_schedule_that_merges_nothing_is_bit_exact_in_every_output_type(pipes, output_type):
    # threshold 1.0: no SSIM exceeds it, so the whole compaction path runs (x̂0, decode, schedule, the
    # pipeline decoding as "pt", conversion to the caller's type) and changes nothing
    pipe = pipes("wan")
    ref = frames(pipe(**call(output_type=output_type)))
    vg = odd.enable(pipe, "vgdfr", threshold=1.0, compress_step=2)
    try:
        got = frames(vg(**call(output_type=output_type)))
        assert vg.schedule.is_identity and vg.schedule.step == 2 and len(vg.schedule.scores) == 3
    finally:
        vg.detach()
    if output_type == "pil":
        assert [[np.asarray(i).tolist() for i in v] for v in got] == [[np.asarray(i).tolist() for i in v] for v in ref]
    elif output_type == "np":
        assert got.dtype == ref.dtype and np.array_equal(got, ref)
    else:
        assert torch.equal(got, ref)


# ---------------------------------------------------------------------- the run, independently
def wan_rotary(model, positions, h, w):
    """Wan's rotary (cos, sin) for frames at ``positions`` of an (h, w)-token grid, from its frequency
    buffers: the first t_dim columns index the frame, the next h_dim the row, the last w_dim the column."""
    rope = model.rope
    t_dim, h_dim, w_dim = rope.t_dim, rope.h_dim, rope.w_dim
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        f = table[:, :t_dim][torch.tensor(positions)]
        hh = table[:, t_dim:t_dim + h_dim][:h]
        ww = table[:, t_dim + h_dim:][:w]
        n = len(positions)
        grid = torch.cat([f.view(n, 1, 1, -1).expand(n, h, w, -1), hh.view(1, h, 1, -1).expand(n, h, w, -1),
                          ww.view(1, 1, w, -1).expand(n, h, w, -1)], -1)
        out.append(grid.reshape(1, n * h * w, 1, -1))
    return tuple(out)


def reference_run(pipe, inputs, groups, k, original):
    """VGDFR by hand: a guided Euler loop on the bare transformer (no overdrive hooks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tr = pipe.transformer
    sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(inputs["num_inference_steps"])
    latents = pipe.prepare_latents(1, 16, SIZE, SIZE, FRAMES, torch.float32, "cpu", torch.Generator().manual_seed(0))
    noise = latents.clone()
    pe, npe, g = inputs["prompt_embeds"], inputs["negative_prompt_embeds"], inputs["guidance_scale"]
    handles = []
    starts = [sum(groups[:j]) for j in range(len(groups))]
    try:
        for i, t in enumerate(sch.timesteps):
            ts = t.expand(1)
            cond = tr(hidden_states=latents, timestep=ts, encoder_hidden_states=pe, return_dict=False)[0]
            unc = tr(hidden_states=latents, timestep=ts, encoder_hidden_states=npe, return_dict=False)[0]
            v = unc + g * (cond - unc)
            s, s_next = sch.sigmas[i], sch.sigmas[i + 1]
            latents = latents + (s_next - s) * v
            if i == k - 1:
                x0 = latents - s_next * v
                merged = torch.cat([x0[:, :, a:a + n].mean(2, keepdim=True) for a, n in zip(starts, groups)], 2)
                eps = torch.cat([noise[:, :, a:a + 1] for a in starts], 2)
                latents = s_next * eps + (1 - s_next) * merged
                table = wan_rotary(tr, starts, SIZE // 16, SIZE // 16)

                def pre(module, args, table=table):
                    return (*args[:3], table, *args[4:])
                handles = [tr.blocks[b].register_forward_pre_hook(pre) for b in original]
    finally:
        for hd in handles:
            hd.remove()
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="pt"), latents


def restore_by_numpy(compact, groups):
    """Frames at every original pixel time by per-pixel linear interpolation (np.interp) between the
    compact frames, placed at the centres of the pixel frames each one merges."""
    times = [0.0]
    for a, n in zip([sum(groups[:j]) for j in range(len(groups))][1:], groups[1:]):
        p = 1 + 4 * (a - 1)
        times += [p + n * q + (n - 1) / 2 for q in range(4)]
    c = compact[0].double().numpy()
    flat = c.reshape(c.shape[0], -1)
    want = np.arange(1 + 4 * (sum(groups) - 1))
    out = np.stack([np.interp(want, times, flat[:, j]) for j in range(flat.shape[1])], 1)
    return torch.from_numpy(out.reshape(len(want), *c.shape[1:]))[None]


def test_a_fixed_schedule_equals_vgdfr_by_hand(pipes, tmp_path):
    pipe = pipes("wan")
    groups, k, original = (1, 2, 1, 2, 1, 1, 1), 2, [1]
    path = FrameRateSchedule(groups).save(tmp_path / "schedule.json")
    inputs = call(num_inference_steps=5)
    with torch.no_grad():
        want_compact, want_latents = reference_run(pipe, call(num_inference_steps=5), groups, k, original)
    vg = odd.enable(pipe, "vgdfr", schedule=str(path), compress_step=k, original_position_blocks=original)
    try:
        with torch.no_grad():
            got = vg(**inputs).frames
            got_latents = vg(**call(num_inference_steps=5, output_type="latent")).frames
    finally:
        odd.disable(pipe)
    assert got_latents.shape == want_latents.shape == (1, 16, 7, SIZE // 8, SIZE // 8)
    assert torch.allclose(got_latents, want_latents, atol=2e-4, rtol=1e-4)
    want = restore_by_numpy(want_compact, groups)
    assert got.shape == want.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert torch.allclose(got.double(), want, atol=2e-4)
    assert vg.schedule.groups == groups and vg.schedule.step == k
    # the denoiser ran 9 latent frames for k steps (cond + uncond), then 7
    assert [n for _, n in vg.denoiser_calls] == [9] * 2 * k + [7] * 2 * (5 - k)


def test_original_positions_change_exactly_the_named_blocks(pipes, tmp_path):
    pipe = pipes("wan")
    path = FrameRateSchedule((1, 2, 2, 2, 1, 1)).save(tmp_path / "s.json")
    outs = {}
    for blocks in ("none", "all", [0]):
        vg = odd.enable(pipe, "vgdfr", schedule=str(path), compress_step=1, original_position_blocks=blocks)
        try:
            outs[str(blocks)] = vg(**call(output_type="latent")).frames
        finally:
            odd.disable(pipe)
    assert not torch.equal(outs["none"], outs["all"]) and not torch.equal(outs["[0]"], outs["all"])
    assert not torch.equal(outs["none"], outs["[0]"])


# ------------------------------------------------------------------------------ shapes, records
@pytest.mark.parametrize("family", ["wan", pytest.param("hunyuanvideo", marks=pytest.mark.slow)])
def test_merging_runs_give_the_original_frame_count_in_every_output_type(pipes, family):
    pipe = pipes(family)
    vg = odd.enable(pipe, "vgdfr", keep_ratio=0.5, compress_step=2, original_position_blocks="all")
    try:
        out = vg(**call(family))
        pt, s = out.frames, vg.schedule
        assert out.schedule is s
        assert s.compact_frames == 6 and s.groups == (1, 2, 2, 2, 1, 1)  # max merging, the closest to 0.5
        assert pt.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(pt).all()
        assert float(pt.min()) >= 0 and float(pt.max()) <= 1
        npy = vg(**call(family, output_type="np")).frames
        assert npy.shape == (1, FRAMES, SIZE, SIZE, 3) and np.allclose(npy, pt.permute(0, 1, 3, 4, 2).numpy())
        pil = vg(**call(family, output_type="pil")).frames
        assert len(pil) == 1 and len(pil[0]) == FRAMES and pil[0][0].size == (SIZE, SIZE)
        lat = vg(**call(family, output_type="latent")).frames
        assert lat.shape[2] == 6
        tup = vg(**call(family, return_dict=False))
        assert isinstance(tup, tuple) and torch.equal(tup[0], pt)
        record = json.loads(json.dumps(s.to_dict()))
        assert record["keep_ratio"] == 6 / 9 and record["original_positions"] == [0, 1, 3, 5, 7, 8]
        assert len(vg.schedules) == 5
    finally:
        odd.disable(pipe)


def test_the_users_callback_still_runs_and_sees_the_short_latent(pipes):
    pipe = pipes("wan")
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, kw["latents"].shape[2]))
        return {}
    vg = odd.enable(pipe, "vgdfr", keep_ratio=0.5, compress_step=2)
    try:
        vg(**call(callback_on_step_end=cb))
    finally:
        odd.disable(pipe)
    assert seen == [(0, 9), (1, 6), (2, 6), (3, 6)]


@pytest.mark.slow  # three more runs of the options the other tests leave at their defaults
def test_pixel_merge_and_latent_estimate_run(pipes):
    pipe = pipes("wan")
    for opts in (dict(merge="pixels"), dict(estimate="latents"), dict(estimate_downsample=1, max_merge=4)):
        vg = odd.enable(pipe, "vgdfr", keep_ratio=0.5, compress_step=2, **opts)
        try:
            out = vg(**call()).frames
        finally:
            odd.disable(pipe)
        assert out.shape == (1, FRAMES, 3, SIZE, SIZE) and vg.schedule.compact_frames < 9, opts


# ---------------------------------------------------------------------- several methods, errors
class PassThrough(DiTHooks):
    def __init__(self, session):
        super().__init__(session)
        self.calls, self.resets = 0, 0

    def denoiser_call(self, step, call):
        self.calls += 1
        return call.run()

    def attention(self, step, block, op):
        return op.compute()

    def reset_caches(self):
        self.resets += 1


def test_combined_with_ditfastattn_and_a_pass_through_method(pipes, tmp_path):
    pipe = pipes("wan")
    path = FrameRateSchedule((1, 2, 2, 2, 1, 1)).save(tmp_path / "s.json")
    opts = dict(schedule=str(path), compress_step=2, original_position_blocks=[1])
    vg = odd.enable(pipe, "vgdfr", **opts)
    try:
        alone = vg(**call(num_inference_steps=5)).frames
        # a second method that passes everything through: identical output, and it is told when the
        # latent shortens (its caches dropped) as well as at the end of the run
        session = vg.session
        probe = session.install(PassThrough(session), "probe")
        assert odd.enabled(pipe) == "vgdfr+probe"
        assert torch.equal(vg(**call(num_inference_steps=5)).frames, alone)
        assert probe.calls == 10 and probe.resets >= 2
        probe.detach()
        # DiTFastAttn reusing attention (AST) across steps: the step after the compaction is computed in full
        att = odd.enable(pipe, "ditfastattn", strategy="ast")
        assert odd.enabled(pipe) == "vgdfr+ditfastattn"
        out = vg(**call(num_inference_steps=5)).frames
        assert out.shape == alone.shape and torch.isfinite(out).all() and not torch.equal(out, alone)
        assert att.reused["ast"] > 0
        with pytest.raises(RuntimeError, match="'ditfastattn' is already enabled"):
            odd.enable(pipe, "ditfastattn", strategy="ast")
    finally:
        assert odd.disable(pipe)
    assert odd.enabled(pipe) is None


def test_errors_name_the_option(pipes, tmp_path):
    pipe = pipes("wan")
    with pytest.raises(ConfigError, match="VGDFRConfig.keep_ratio must be in"):
        odd.enable(pipe, "vgdfr", keep_ratio=1.5)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['ratio'\]"):
        odd.enable(pipe, "vgdfr", ratio=0.5)
    with pytest.raises(ConfigError, match=r"original_position_blocks: blocks \[7\] do not exist; the denoiser has 2"):
        odd.enable(pipe, "vgdfr", original_position_blocks=[7])
    with pytest.raises(ConfigError, match="VGDFRConfig.interpolator 'nope.mod:fn': cannot import"):
        odd.enable(pipe, "vgdfr", interpolator="nope.mod:fn")
    with pytest.raises(TypeError, match="pass the diffusers pipeline, not its transformer"):
        odd.enable(pipe.transformer, "vgdfr")
    assert odd.enabled(pipe) is None  # nothing half-attached
    vg = odd.enable(pipe, "vgdfr", compress_step=4)
    try:
        with pytest.raises(ConfigError, match="compress_step=4 must be below num_inference_steps=4"):
            vg(**call())
        with pytest.raises(RuntimeError, match="call the object overdrive.diffusers.enable returned"):
            pipe(**call())
    finally:
        odd.disable(pipe)
    path = FrameRateSchedule((1, 2, 1)).save(tmp_path / "s.json")
    vg = odd.enable(pipe, "vgdfr", schedule=str(path), compress_step=1)
    try:
        with pytest.raises(ConfigError, match="recorded schedule covers 4 latent frames of 4 pixel frames each; this run has 9 of 4"):
            vg(**call())
    finally:
        odd.disable(pipe)
    with pytest.raises(RuntimeError, match="was disabled"):
        vg(**call())


def test_an_unsupported_scheduler_is_a_clear_error():
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_pipeline("wan")
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    with pytest.raises(ConfigError, match="scheduler UniPCMultistepScheduler is not supported.*FlowMatchEuler"):
        odd.enable(pipe, "vgdfr")
    assert odd.enabled(pipe) is None


# --------------------------------------------------------------------------------------- DLFR-VAE
def test_dlfr_vae_lowers_the_frame_rate_of_the_static_half(pipes):
    pipe = pipes("wan")
    codec = odd.video_codec(pipe)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1
    video[:, :, 9:] = video[:, :, 9:10]  # pixel frames 9.. do not move: latent chunks 3..4 and 5..6 are static
    with torch.no_grad():
        plain = codec.encode(video)
        assert plain.shape == (1, 16, 9, SIZE // 8, SIZE // 8)
        lat, s = dlfr.encode(codec, video, threshold=0.9)
        assert s.groups == (1, 1, 1, 2, 2, 1, 1) and lat.shape == (1, 16, 7, SIZE // 8, SIZE // 8)
        out = dlfr.decode(codec, lat, s)
        assert out.shape == video.shape
        # keep ratio 1.0 (or nothing similar enough) is the VAE's own encode and decode
        same, s1 = dlfr.encode(codec, video, keep_ratio=1.0)
        assert s1.is_identity and torch.equal(same, plain)
        assert torch.equal(dlfr.decode(codec, same, s1), codec.decode(plain))
        # merging identical frames changes nothing, so the short latent is the VAE's encoding of the video
        # with every second frame of the static chunks dropped (pixels 9..24 at half the frame rate)
        kept = list(range(9)) + list(range(9, 25, 2)) + list(range(25, FRAMES))
        assert torch.equal(lat, codec.encode(video[:, :, kept]))
    with pytest.raises(ValueError, match="F = 1 \\+ 4 k frames"):
        dlfr.encode(codec, video[:, :, :10], threshold=0.9)


# -------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow  # ~30 s: saves and loads a pipeline, two runs
def test_cli_generates_with_the_schedule_recorded(tmp_path, capsys):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    from overdrive.cli import main

    tiny_pipeline("wan").save_pretrained(tmp_path / "pipe")
    inputs = call()
    save_file({k: v.contiguous() for k, v in inputs.items() if torch.is_tensor(v)}, str(tmp_path / "embeds.safetensors"))
    argv = ["generate", "--method", "vgdfr", "--pipeline", str(tmp_path / "pipe"), "--embeds",
            str(tmp_path / "embeds.safetensors"), "--steps", str(STEPS), "--num-frames", str(FRAMES), "--height",
            str(SIZE), "--width", str(SIZE), "--keep-ratio", "0.5", "--compress-step", "2",
            "--original-position-blocks", "1", "--output", str(tmp_path / "video.safetensors"),
            "--schedule-out", str(tmp_path / "schedule.json")]
    assert main(argv) == 0, capsys.readouterr().err
    assert "latent frames kept 0.667" in capsys.readouterr().out
    with safe_open(str(tmp_path / "video.safetensors"), "pt") as f:
        video, meta = f.get_tensor("frames"), f.metadata()
    recorded = FrameRateSchedule.load(tmp_path / "schedule.json")
    assert FrameRateSchedule.from_dict(json.loads(meta["schedule"])) == recorded and recorded.compact_frames == 6
    assert json.loads(meta["options"])["original_position_blocks"] == [1]
    # the same run through the Python API on the saved pipeline
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", text_encoder=None, tokenizer=None)
    loaded.set_progress_bar_config(disable=True)
    vg = odd.enable(loaded, "vgdfr", keep_ratio=0.5, compress_step=2, original_position_blocks=[1])
    with torch.no_grad():
        want = vg(**inputs).frames
    assert vg.schedule == recorded and torch.equal(video, want)
    # bad options: one line naming the option, exit status 2, nothing written
    for swap, match in ((["--keep-ratio", "2"], r"VGDFRConfig\.keep_ratio must be in \(0, 1\]"),
                        (["--compress-step", "4"], "compress_step=4 must be below num_inference_steps=4"),
                        (["--original-position-blocks", "a,b"], "--original-position-blocks 'a,b': expected")):
        bad = list(argv)
        bad[bad.index(swap[0]) + 1] = swap[1]
        bad[bad.index("--output") + 1] = str(tmp_path / "bad.safetensors")
        assert main(bad) == 2
        assert re.search(match, capsys.readouterr().err)
        assert not (tmp_path / "bad.safetensors").exists()

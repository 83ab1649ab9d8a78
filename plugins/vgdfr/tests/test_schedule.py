"""VGDFR's schedule and the frame-rate contract's group algebra, against closed forms and float64 loops."""
from __future__ import annotations

import math

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.contracts.frame_rate import (CompactionPlan, FrameRateSchedule, blend, flow_renoise, flow_x0,
                                            group_starts, merge_groups, nearest, resample_frames, restore_frames)
from overdrive.vgdfr.config import PAPER_ORIGINAL_BLOCKS, VGDFRConfig
from overdrive.vgdfr.method import METHOD
from overdrive.vgdfr.runtime import load_interpolator, original_blocks
from overdrive.vgdfr.schedule import chunk_layout, groups_at, score_chunks

R = 4  # pixel frames per latent frame


def pixels_of(latent_frames: int) -> int:
    return 1 + R * (latent_frames - 1)


def static_halves(latent_frames: int, static_from: int, b: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(B, F, 3, H, W) pixel frames in [0, 1]: independent noise frames up to pixel frame ``static_from``,
    then one frame repeated (a video whose second half does not move)."""
    g = torch.Generator().manual_seed(seed)
    f = pixels_of(latent_frames)
    x = torch.rand(b, f, 3, size, size, generator=g)
    x[:, static_from:] = x[:, static_from:static_from + 1]
    return x


def sched(frames, latent_frames, **cfg):
    return METHOD.schedule(frames, latent_frames, VGDFRConfig(**cfg), pixels=True, temporal_factor=R, causal_first=True)


# ------------------------------------------------------------------------------------- schedule
def test_schedule_bookkeeping_closed_forms():
    s = FrameRateSchedule((1, 2, 1, 2, 1, 1))
    assert (s.latent_frames, s.compact_frames) == (8, 6) and s.keep_ratio == 6 / 8
    assert s.starts == (0, 1, 3, 4, 6, 7)
    assert s.pixel_frames() == 29 and s.pixel_frames(6) == 21
    # latent 0 = pixel 0; a group of m latent frames = 4 compact pixel frames merging m pixel frames each
    assert s.pixel_groups() == (1, 2, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2, 2) + (1,) * 8
    assert sum(s.pixel_groups()) == 29 and len(s.pixel_groups()) == 21
    t = s.compact_pixel_times().tolist()
    # group (start 1, m 2) covers pixels 1..8: merged pairs (1,2), (3,4), (5,6), (7,8) -> centres
    assert t[:5] == [0.0, 1.5, 3.5, 5.5, 7.5] and t[5:9] == [9.0, 10.0, 11.0, 12.0] and t[9:13] == [13.5, 15.5, 17.5, 19.5]
    assert t[-1] == 28.0 and len(t) == 21
    assert FrameRateSchedule.identity(5).is_identity and not s.is_identity


def test_schedule_records_round_trip_and_bad_ones_are_named(tmp_path):
    s = FrameRateSchedule((1, 2, 2, 1), step=3, threshold=0.5, scores=(0.7, 0.6))
    back = FrameRateSchedule.load(s.save(tmp_path / "s.json"))
    assert back == s and back.to_dict()["original_positions"] == [0, 1, 3, 5]
    with pytest.raises(ConfigError, match="groups\\[0\\] must be 1"):
        FrameRateSchedule((2, 1))
    with pytest.raises(ConfigError, match="positive sizes"):
        FrameRateSchedule((1, 0))
    (tmp_path / "bad.json").write_text('{"groups": [1, 2], "latent_frames": 4}')
    with pytest.raises(ConfigError, match="latent_frames=4 disagrees"):
        FrameRateSchedule.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="no such file"):
        FrameRateSchedule.load(tmp_path / "missing.json", option="--schedule")


def test_a_video_with_a_static_half_merges_exactly_that_half():
    # 9 latent frames; chunks (2 latent frames each) start at 1, 3, 5; frames 7, 8 are the protected tail.
    # Pixels from 9 on are static: chunks 5..6 (pixels 17..24) and 3..4 (pixels 9..16) are static, 1..2 is not.
    frames = static_halves(9, static_from=9)
    assert chunk_layout(9, 2, 2, True) == [1, 3, 5]
    s = sched(frames, 9, threshold=0.9)
    assert s.groups == (1, 1, 1, 2, 2, 1, 1)
    assert s.scores[1] == pytest.approx(1.0) and s.scores[2] == pytest.approx(1.0) and s.scores[0] < 0.5
    # the target that is exactly the static half gives the same schedule; a lower target cannot merge more
    # static frames, so the closest reachable ratio merges the moving chunk too
    assert sched(frames, 9, keep_ratio=7 / 9).groups == (1, 1, 1, 2, 2, 1, 1)
    assert sched(frames, 9, keep_ratio=0.1).groups == (1, 2, 2, 2, 1, 1)
    assert sched(frames, 9, keep_ratio=1.0).groups == (1,) * 9
    # the batch shares one schedule: a second, fully moving video keeps every chunk
    both = torch.cat([frames, static_halves(9, static_from=33, seed=1)])
    assert sched(both, 9, threshold=0.9).is_identity


def test_four_fold_merges_where_a_whole_chunk_is_static():
    # 11 latent frames, max_merge 4: chunks at 1 and 5; tail 9, 10. Static from pixel 17 (latent 5 on).
    frames = static_halves(11, static_from=17)
    s = sched(frames, 11, threshold=0.9, max_merge=4)
    assert s.groups == (1, 1, 1, 1, 1, 4, 1, 1)
    # a chunk static only in its second half merges that half 2x
    s = sched(static_halves(11, static_from=9), 11, threshold=0.9, max_merge=4)
    assert s.groups == (1, 1, 1, 2, 4, 1, 1)


def test_keep_ratio_comes_closest_and_prefers_fewer_merges():
    # graded similarity: chunk scores increase along the video, so a lower target merges more chunks
    g = torch.Generator().manual_seed(3)
    f = pixels_of(13)
    base = torch.rand(1, 1, 3, 16, 16, generator=g)
    noise = torch.rand(1, f, 3, 16, 16, generator=g)
    mix = torch.linspace(0.9, 0.0, f).view(1, f, 1, 1, 1)
    frames = base + mix * (noise - base)
    chunks = score_chunks(frames, 13, pixels=True, temporal_factor=R, causal_first=True, max_merge=2, protect_tail=2)
    counts = {len(groups_at(chunks, 13, t)) for t in [1.0] + [x / 1000 for x in range(1000, -1000, -1)]}
    assert len(counts) > 3  # the grid reaches several ratios
    for target in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):
        s = sched(frames, 13, keep_ratio=target)
        # brute force over a fine grid of thresholds: the closest ratio, fewest merges on ties
        best = min((abs(n / 13 - target), -n) for n in counts)
        assert (abs(s.keep_ratio - target), -s.compact_frames) == pytest.approx(best)
        assert s.groups == groups_at(chunks, 13, s.threshold if s.threshold is not None else math.inf)


def test_latent_frames_can_be_scored_without_decoding():
    lat = torch.randn(1, 9, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    lat[:, 3:] = lat[:, 3:4]
    s = METHOD.schedule(lat, 9, VGDFRConfig(threshold=0.9), pixels=False, temporal_factor=R, causal_first=True)
    assert s.groups == (1, 1, 1, 2, 2, 1, 1)
    with pytest.raises(ValueError, match=r"expected \(B, 9, C, H, W\) latent frames"):
        METHOD.schedule(lat[:, :5], 9, VGDFRConfig(threshold=0.9), pixels=False, temporal_factor=R, causal_first=True)


# --------------------------------------------------------------------------------- group algebra
def test_merge_and_group_starts_against_a_float64_loop():
    x = torch.randn(2, 3, 8, 2, 2, dtype=torch.float64)
    groups = (1, 2, 1, 3, 1)
    want, starts, s = [], [], 0
    for g in groups:
        want.append(x[:, :, s:s + g].sum(2, keepdim=True) / g)
        starts.append(x[:, :, s:s + 1])
        s += g
    assert torch.allclose(merge_groups(x, groups, 2), torch.cat(want, 2), atol=1e-15)
    assert torch.equal(group_starts(x, groups, 2), torch.cat(starts, 2))
    assert torch.equal(merge_groups(x, (1,) * 8, 2), x)
    with pytest.raises(ValueError, match="covers 7"):
        merge_groups(x, (1, 2, 4), 2)


def test_restore_is_exact_on_a_video_linear_in_time():
    # every pixel linear in time: merged pairs sit at their centre times, so a linear blend restores every
    # original frame exactly (the protected tail and frame 0 are kept; nothing is extrapolated)
    s = FrameRateSchedule((1, 2, 2, 1, 1))
    f = s.pixel_frames()
    t = torch.arange(f, dtype=torch.float64).view(1, f, 1, 1, 1)
    slope, offset = torch.randn(1, 1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 1, 3, 4, 4, dtype=torch.float64)
    video = offset + slope * t
    compact = merge_groups(video, s.pixel_groups(), dim=1)
    assert compact.shape[1] == s.pixel_frames(s.compact_frames)
    assert torch.allclose(restore_frames(compact, s, blend, dim=1), video, atol=1e-12)
    # nearest repeats frames: each restored frame is one of the compact frames
    rep = restore_frames(compact, s, nearest, dim=1)
    assert all(any(torch.equal(rep[:, i], compact[:, j]) for j in range(compact.shape[1])) for i in range(f))
    with pytest.raises(ValueError, match="decode to 17"):
        restore_frames(video, s, blend, dim=1)


def test_resample_copies_exact_times_and_clamps_outside():
    frames = torch.arange(4, dtype=torch.float64).view(4, 1) * 10
    out = resample_frames(frames, torch.tensor([0.0, 1.0, 3.0, 4.0]), torch.tensor([-1.0, 0.0, 0.5, 2.0, 4.0, 9.0]),
                          blend, 0)
    assert out.flatten().tolist() == [0.0, 0.0, 5.0, 15.0, 30.0, 30.0]


def test_flow_matching_x0_and_renoise_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    s0, s1 = 0.9, 0.7
    before = flow_renoise(x0, eps, s0)
    after = before + (s1 - s0) * (eps - x0)  # one Euler step with the exact velocity
    assert torch.allclose(flow_x0(before, after, s0, s1), x0, atol=1e-5)
    assert torch.allclose(flow_renoise(x0, eps, s1), after, atol=1e-6)


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("options, message", [
    (dict(keep_ratio=0.5, threshold=0.5), "keep_ratio .* or threshold, not both"),
    (dict(keep_ratio=0.0), "keep_ratio must be in \\(0, 1\\]"),
    (dict(threshold=1.5), "threshold must be an SSIM level"),
    (dict(compress_step=0), "compress_step must be >= 1"),
    (dict(max_merge=3), "max_merge must be 2 or 4"),
    (dict(estimate="flow"), "estimate must be 'pixels' or 'latents'"),
    (dict(merge="both"), "merge must be 'latents' or 'pixels'"),
    (dict(original_position_blocks="some"), "original_position_blocks must be 'auto'"),
    (dict(original_position_blocks=[1, -2]), "original_position_blocks must list block indices"),
    (dict(interpolator="rife"), "interpolator must be one of"),
    (dict(keep_ratio="0.5"), "keep_ratio must be float"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match="VGDFRConfig" + (".*" if "not both" in message else "\\.") + message):
        VGDFRConfig(**options)


def test_plan_checks_the_run_and_keep_ratio_one_is_no_plan(tmp_path):
    assert METHOD.plan(VGDFRConfig(keep_ratio=1.0), 4) is None
    assert METHOD.plan(VGDFRConfig(), 50) == CompactionPlan(5, "pixels", 2, "latents")
    with pytest.raises(ConfigError, match="compress_step=5 must be below num_inference_steps=4"):
        METHOD.plan(VGDFRConfig(), 4)
    path = FrameRateSchedule((1, 2, 1)).save(tmp_path / "s.json")
    assert METHOD.plan(VGDFRConfig(schedule=str(path), compress_step=1), 3).fixed == FrameRateSchedule((1, 2, 1))
    with pytest.raises(ConfigError, match="VGDFRConfig.schedule .*no such file"):
        METHOD.plan(VGDFRConfig(schedule=str(tmp_path / "nope.json")), 9)


def test_original_position_blocks():
    assert original_blocks("auto", 60) == frozenset(PAPER_ORIGINAL_BLOCKS)
    # other depths: the paper's blocks at the same relative depth
    assert original_blocks("auto", 30) == frozenset(round(b * 29 / 59) for b in PAPER_ORIGINAL_BLOCKS)
    assert original_blocks("none", 4) == frozenset() and original_blocks("all", 3) == {0, 1, 2}
    assert original_blocks([0, 2], 3) == {0, 2}
    with pytest.raises(ConfigError, match=r"blocks \[5\] do not exist; the denoiser has 3 blocks"):
        original_blocks([0, 5], 3)


def test_interpolators_load_by_name():
    assert load_interpolator("blend") is blend and load_interpolator("nearest") is nearest
    assert load_interpolator("overdrive.contracts.frame_rate:blend") is blend
    with pytest.raises(ConfigError, match="cannot import it"):
        load_interpolator("overdrive.nope:interp")
    assert math.isclose(float(blend(torch.zeros(1), torch.ones(1), torch.tensor([0.25]))), 0.25)

"""DiTFastAttn plans: JSON format, validation, schedule lookahead and the FLOPs cost model."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.ditfastattn.config import (FULL, DiTFastAttnConfig, Entry, Identity, Plan, Uniform, band_for, entry_code,
                                        flops_fraction, parse_entry)

IDENT = Identity("FluxTransformer2DModel", "flux", blocks=3, heads=4, head_dim=16, vision_tokens=64,
                 text_tokens=12, steps=4)


def _plan_dict(steps: list[list], **over) -> dict:
    d = {"format": "overdrive-ditfastattn-plan", "version": 1, "variant": "v1", "window": 8,
         "model": dict(IDENT.__dict__), "steps": steps, "meta": {"x": 1}}
    d.update(over)
    return d


def test_band_is_ceil_of_vision_over_2k():
    for n in (1, 7, 64, 4096, 16384, 32760):
        for k in (8, 16, 32):
            assert band_for(k, n) == -(-n // (2 * k))


def test_v1_and_v2_entries_round_trip_through_json(tmp_path):
    rows = [["full", "full", "full"],
            ["ast", "wars", ["full", "share", "arrow:8", "arrow:32"]],
            ["asc", "wars+asc", {"heads": ["arrow:16", "full", "share", "share"], "asc": True}],
            ["full", "ast", "ast"]]
    plan = Plan.from_dict(_plan_dict(rows))
    assert plan.entries[1][0] == Entry(skip=True)
    assert plan.entries[1][1] == Entry(residual=True, window=(8,) * 4)
    assert plan.entries[1][2].window == (-1, -1, band_for(8, 64), band_for(32, 64))
    assert plan.entries[1][2].share_heads == (False, True, False, False)
    assert plan.entries[2][2].asc and plan.entries[2][2].share_heads == (False, False, True, True)
    assert plan.to_dict()["steps"] == rows
    path = plan.save(tmp_path / "p.json")
    again = Plan.load(path)
    assert again.entries == plan.entries and again.identity == plan.identity and again.meta == {"x": 1}
    assert json.loads(path.read_text())["steps"] == rows


@pytest.mark.parametrize("rows, match", [
    ([["nope"] * 3] * 4, "step 0 block 0: unknown method 'nope'"),
    ([["full"] * 3] * 3, "must list 4 steps"),
    ([["full"] * 2] * 4, "step 0 must list 3 block entries"),
    ([["full"] * 3, ["full", "full", ["full", "full"]]] + [["full"] * 3] * 2, "expected 4 per-head codes"),
    ([["full"] * 3, ["full", "full", ["full", "full", "full", "arrow:0"]]] + [["full"] * 3] * 2, "head 3: unknown code"),
    ([["ast", "full", "full"]] + [["full"] * 3] * 3, "step 0 block 0 reuses an earlier step"),
    ([["full", "asc", "full"], ["full", "wars", "full"]] + [["full"] * 3] * 2, "step 1 block 1 uses WA-RS before any full step"),
])
def test_bad_plans_name_the_entry(rows, match):
    with pytest.raises(ConfigError, match=match):
        Plan.from_dict(_plan_dict(rows), "p.json")


def test_bad_files_and_headers(tmp_path):
    with pytest.raises(ConfigError, match="no such DiTFastAttn plan file"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not a DiTFastAttn plan"):
        Plan.from_dict({"format": "other"})
    with pytest.raises(ConfigError, match="plan version 7 is not supported"):
        Plan.from_dict(_plan_dict([["full"] * 3] * 4, version=7))
    with pytest.raises(ConfigError, match='"model" must give'):
        Plan.from_dict(_plan_dict([["full"] * 3] * 4, model={"blocks": 3}))


def test_identity_mismatch_names_the_field():
    other = Identity(**{**IDENT.__dict__, "vision_tokens": 256})
    with pytest.raises(ConfigError, match=r"p.json: .*vision_tokens=64, but .* vision_tokens=256 \(a different resolution"):
        IDENT.mismatch(other, "p.json")
    IDENT.mismatch(Identity(**IDENT.__dict__), "p.json")


def test_schedule_lookahead_for_kept_outputs_heads_and_residuals():
    share = parse_entry(["share", "full", "full", "full"], 4, 64, 8, "x")
    rows = [["full"] * 3, ["ast", "wars", "ast"], ["ast", "ast", [*["share"] * 4]], ["full", "wars", "full"]]
    rows[2][2] = ["share", "full", "full", "full"]
    plan = Plan.from_dict(_plan_dict(rows))
    assert plan.entries[2][2] == share
    assert plan.keep_output(0, 0) and plan.keep_output(1, 0) and not plan.keep_output(2, 0)
    # block 2: step 1 is AST, so the heads step 2 shares must be kept at step 0 (the last computed step)
    assert plan.keep_heads(0, 2) and not plan.keep_heads(2, 2)
    # block 1: the residual for step 1's WA-RS is made at step 0; step 3's WA-RS reuses the same one
    assert plan.residual_window(0, 1) == 8 and plan.residual_window(0, 0) is None
    uni = Uniform.of("arrow", 4, 64, 8, warmup=2, arrow_k=16)
    assert uni.entry(1, 0) is FULL and uni.entry(2, 0).window == (band_for(16, 64),) * 4


def _dense_pairs(s: int, w: int, text: tuple[int, int]) -> int:
    """Allowed query-key pairs counted by enumeration (the definition, not the closed form)."""
    if w < 0:
        return s * s
    t0, t1 = text
    vis = [i for i in range(s) if not t0 <= i < t1]
    pos = {i: r for r, i in enumerate(vis)}
    n = 0
    for i in range(s):
        for j in range(s):
            if t0 <= i < t1 or t0 <= j < t1 or abs(pos[i] - pos[j]) <= w:
                n += 1
    return n


def test_flops_fraction_matches_enumeration_over_random_plans():
    rng = random.Random(0)
    heads, d, vision, text_n = 3, 8, 40, 6
    s = vision + text_n
    for text in ((0, text_n), (vision, s)):
        for _ in range(20):
            steps, blocks, window = 4, 2, rng.choice([2, 5, 9])
            entries = [[FULL] * blocks]
            for _t in range(1, steps):
                row = []
                for _b in range(blocks):
                    kind = rng.choice(["full", "ast", "wars", "heads"])
                    if kind == "heads":
                        codes = [rng.choice(["full", "share", "arrow:8", "arrow:16"]) for _ in range(heads)]
                        row.append(parse_entry(codes, heads, vision, window, "x"))
                    else:
                        row.append(parse_entry(kind, heads, vision, window, "x"))
                entries.append(row)
            cfg = rng.random() < 0.5
            if cfg:
                entries[-1] = [Entry(asc=True, window=e.window, share_heads=e.share_heads) if not e.skip else e
                               for e in entries[-1]]
            # the definition: per (step, block) the pairs each head computes, x 4d FLOPs
            total = done = 0
            plan = Plan(Identity("", "", blocks, heads, d, vision, text_n, steps), "v1", window, entries)
            for t in range(steps):
                for b in range(blocks):
                    e = entries[t][b]
                    total += heads * s * s * 4 * d
                    if e.skip:
                        continue
                    cost = 0
                    for h in range(heads):
                        if e.share_heads and e.share_heads[h]:
                            continue
                        w = e.window[h] if e.window else -1
                        cost += _dense_pairs(s, w, text) * 4 * d
                    if e.is_full and plan.residual_window(t, b) is not None:
                        cost += heads * _dense_pairs(s, plan.residual_window(t, b), text) * 4 * d
                    done += cost / 2 if (e.asc and cfg) else cost
            got = flops_fraction(entries, heads, s, text, d, cfg)
            assert math.isclose(got, done / total, rel_tol=1e-12), (got, done / total)


def test_entry_code_inverts_parse_entry():
    for raw in ("full", "ast", "asc", "wars", "wars+asc", ["arrow:8", "share", "full", "arrow:32"],
                {"heads": ["share", "share", "full", "arrow:16"], "asc": True}):
        e = parse_entry(raw, 4, 64, 8, "x")
        assert entry_code(e, 4, 64, 8) == raw


@pytest.mark.parametrize("opts, match", [
    ({}, "give plan=PATH"),
    ({"plan": "p.json", "strategy": "ast"}, "either plan"),
    ({"strategy": "fast"}, "strategy must be one of"),
    ({"strategy": "arrow", "arrow_k": 4}, "arrow_k must be one of"),
    ({"strategy": "wars", "window_fraction": 1.5}, "window_fraction must be in"),
    ({"strategy": "ast", "warmup": 0}, "warmup must be >= 1"),
])
def test_config_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        DiTFastAttnConfig(**opts).validate()


def test_window_for_uniform_wars_uses_every_head():
    e = Uniform.of("wars+asc", 2, 100, 12, warmup=1, arrow_k=8).entry(1, 0)
    assert e.residual and e.asc and e.window == (12, 12)
    assert torch.tensor(e.window).tolist() == [12, 12]

"""A tiny diffusers pipeline through overdrive.diffusers: enable, run, disable restores exactly."""
from __future__ import annotations

import pytest
import torch

import overdrive
import overdrive.diffusers as odd
from overdrive.testing import pipeline_inputs, tiny_pipeline

STEPS = 4


def _images(pipe, family, **kw):
    out = pipe(**pipeline_inputs(family, num_inference_steps=STEPS, output_type="pt", **kw))
    return (out.images if hasattr(out, "images") else out.frames if hasattr(out, "frames") else out[0])


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_enable_run_disable_restores_identical_output(example_registry, family):
    pipe = tiny_pipeline(family)
    base = _images(pipe, family)
    att = odd.enable(pipe, "example_stepcache", interval=2, warmup=1)
    assert odd.enabled(pipe) == "example_stepcache"
    cached = _images(pipe, family)
    # closed form: warmup 1, interval 2 -> of the 4 calls per branch, calls 0, 1 and 3 are computed
    assert set(att.computed.values()) == {3}
    assert torch.isfinite(cached).all() and not torch.equal(cached, base)
    assert odd.disable(pipe) is True and odd.enabled(pipe) is None
    assert torch.equal(_images(pipe, family), base)
    assert odd.disable(pipe) is False


def test_interval_one_is_exactly_the_plain_pipeline(example_registry):
    pipe = tiny_pipeline("flux")
    base = _images(pipe, "flux")
    odd.enable(pipe, "example_stepcache", interval=1)
    try:
        assert torch.equal(_images(pipe, "flux"), base)
    finally:
        odd.disable(pipe)


def test_errors_say_what_to_do(example_registry):
    pipe = tiny_pipeline("flux")
    with pytest.raises(overdrive.UnknownMethodError, match=r"unknown diffusers method 'nope' \(DiT caching / attention compression or frame-rate schedule\); known: (.*, )?example_stepcache"):
        odd.enable(pipe, "nope")
    with pytest.raises(overdrive.UnknownMethodError, match=r"known: (.*, )?example_stepcache"):
        odd.enable(pipe, "example_w8")  # a weight-quant method is not a DiT method
    with pytest.raises(overdrive.ConfigError, match="interval must be >= 1"):
        odd.enable(pipe, "example_stepcache", interval=0)
    assert odd.enabled(pipe) is None  # nothing half-attached
    odd.enable(pipe, "example_stepcache")
    with pytest.raises(RuntimeError, match="already enabled"):
        odd.enable(pipe, "example_stepcache")
    odd.disable(pipe)
    with pytest.raises(TypeError, match="not a known DiT denoiser"):
        odd.enable(torch.nn.Linear(2, 2), "example_stepcache")

"""The PCDVQ quality benchmark's coupled E8 baseline: its closed-form decoder is the exact nearest point."""
from __future__ import annotations

import torch

from overdrive.benchmarks.pcdvq_quality import E8Ball
from overdrive.pcdvq.codebook import e8_points


def test_e8_ball_decoder_is_the_nearest_point():
    ball = E8Ball(6)
    pts = torch.cat([torch.zeros(1, 8, dtype=torch.float64), torch.from_numpy(e8_points(6)).double() / 2])
    assert ball.size == len(pts) == 1 + 240 + 2160 + 6720
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g, dtype=torch.float64) * 0.9
    d = torch.cdist(x, pts)
    ref = pts[d.argmin(1)]
    got = ball.decode(x)
    # ties (equal distance to two points) are measure zero for Gaussian inputs; compare distances too
    assert torch.allclose((got - x).norm(dim=1), d.min(1).values, atol=1e-12, rtol=0)
    assert torch.equal(got, ref)

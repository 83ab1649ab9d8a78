"""``overdrive calibrate --method viditq``: the shared pipeline options plus ViDiT-Q's (run by the
diffusers hook layer's calibrate command, which calls :mod:`.calibrate` with :func:`options_from_args`)."""
from __future__ import annotations

import argparse
from typing import Any

from overdrive.contracts.dit_cache import add_pipeline_arguments

from .config import DEFAULT_ALPHA_GRID, DEFAULT_EMA, SCHEMES


def _alpha_arg(text: str) -> Any:
    if text in ("search", "default"):
        return text
    vals = [None if v.strip().lower() == "none" else float(v) for v in text.split(",")]
    return vals[0] if len(vals) == 1 else vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``overdrive calibrate --method viditq``: the shared pipeline options plus ViDiT-Q's."""
    add_pipeline_arguments(p)
    p.add_argument("--scheme", choices=sorted(SCHEMES), default="w8a8",
                   help="w8a8: int8 weights and activations; w4a8: int4 weights, int8 activations")
    p.add_argument("--ranges", type=int, default=2,
                   help="timestep ranges (contiguous groups of steps) with their own balancing / bits; 1 = not "
                        "timestep-aware (one weight set)")
    p.add_argument("--alpha", type=_alpha_arg, default="default",
                   help="channel-balancing alpha: 'search' (per range, over --alpha-grid), a number, 'none', or a "
                        "comma list per range; default: none for w8a8, search for w4a8")
    p.add_argument("--alpha-grid", default=",".join("none" if a is None else f"{a:g}" for a in DEFAULT_ALPHA_GRID),
                   help="candidates of --alpha search")
    p.add_argument("--mixed-precision", type=float, default=0.0,
                   help="w4a8: the largest fraction of quantized weights kept at 8 bits, chosen per range by a "
                        "measured sensitivity of each layer group (0 = off)")
    p.add_argument("--keep-float", action="append", default=[],
                   help="name substring of layers inside the blocks to keep in 16 bits (repeatable)")
    p.add_argument("--ema", type=float, default=DEFAULT_EMA, help="EMA factor of the activation channel maxima")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    grid = [None if v.strip().lower() == "none" else float(v) for v in args.alpha_grid.split(",")]
    return dict(scheme=args.scheme, ranges=args.ranges, alpha=args.alpha, alpha_grid=grid,
                mixed_precision=args.mixed_precision, keep_float=list(args.keep_float), ema=args.ema)

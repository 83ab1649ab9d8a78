"""``overdrive calibrate --method ditfastattn``: the shared pipeline options plus the search's own
(run by the diffusers hook layer's calibrate command, which calls :mod:`.calibrate`)."""
from __future__ import annotations

import argparse

from overdrive.contracts.dit_cache import add_pipeline_arguments

from .config import V1_DEFAULT_THRESHOLD, V2_DEFAULT_ALPHA


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``overdrive calibrate --method ditfastattn``: the shared pipeline options plus the search's own."""
    add_pipeline_arguments(p)
    p.add_argument("--variant", choices=("v1", "v2"), default="v1",
                   help="v1: per-block greedy (AST / WA-RS / ASC); v2: per-head integer program (share / arrow)")
    p.add_argument("--threshold", type=float, default=V1_DEFAULT_THRESHOLD, help="v1 loss threshold")
    p.add_argument("--alpha", type=float, default=V2_DEFAULT_ALPHA, help="v2 per-block error budget sum(rse)")
    p.add_argument("--window-fraction", type=float, default=0.125,
                   help="v1 WA-RS window half-width as a fraction of the vision tokens")

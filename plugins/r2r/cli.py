"""``overdrive calibrate --method r2r``: label small/large mismatches and train the router (:mod:`.calibrate`)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import add_device_arguments, check_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", required=True, type=Path, help="small model checkpoint (transformers folder)")
    p.add_argument("--large", type=Path, help="large model checkpoint (same tokenizer); not needed with --labels")
    p.add_argument("--output", required=True, type=Path, help="router folder to write (must not exist; unused with "
                                                              "--labels-only)")
    p.add_argument("--data", type=Path, help="queries, JSON lines: {'prompt'|'messages', optional 'answer'}")
    p.add_argument("--limit", type=int, default=0, help="use only the first N queries")
    p.add_argument("--labels", type=Path, help="train from this labels file instead of labelling")
    p.add_argument("--labels-out", type=Path, help="also save the labels (safetensors)")
    p.add_argument("--labels-only", action="store_true", help="stop after writing --labels-out (train later with --labels)")
    add_device_arguments(p, dtype_default="float32", activations=False)
    g = p.add_argument_group("labelling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="length of the large model's answers")
    g.add_argument("--continuation-tokens", type=int, default=32, help="longest continuation from a mismatch")
    g.add_argument("--sentence-end", default=".!?\n", help="characters whose token ends a sentence")
    g.add_argument("--judge", default="agreement",
                   help="'agreement' (the large model's own continuation agreement) or package.module:factory, "
                        "called as factory(small=, large=, tokenizer=) and returning a Judge")
    g.add_argument("--judge-margin", type=float, default=math.inf,
                   help="agreement judge: also require log p_large(own) - log p_large(small token) <= this (nats)")
    g = p.add_argument_group("router")
    g.add_argument("--topk", type=int, default=None,
                   help="top logits the router reads (default 100; with --labels, as many as the labels carry)")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--blocks", type=int, default=6)
    g.add_argument("--expansion", type=int, default=4)
    g.add_argument("--dropout", type=float, default=0.1)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--batch-size", type=int, default=1024)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--recall", type=float, default=0.95, help="divergent-token recall the threshold must keep")
    g.add_argument("--val-fraction", type=float, default=0.1, help="fraction of queries held out to pick the threshold")
    g.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        from .calibrate import calibrate

        check_device(args.device)
        calibrate(args)
    except ConfigError as e:
        print(f"overdrive calibrate --method r2r: {e}", file=sys.stderr)
        return 2
    return 0

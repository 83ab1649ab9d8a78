"""``overdrive calibrate --method vocabtailor``: argparse glue (tokenization runs in the transformers adapter)."""
from __future__ import annotations

import argparse

from .config import ProfileOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (its config.json and tokenizer are read; no weights)")
    p.add_argument("--corpus", required=True, nargs="+", metavar="FILE",
                   help="task corpus: .jsonl (one object per line; the 'output' field, see --field) or text "
                        "(documents separated by blank lines)")
    p.add_argument("--output", required=True, help="profile JSON to write")
    p.add_argument("--field", default=None, help="JSONL field holding a document (default: output, response, "
                   "completion or text)")
    d = ProfileOptions()
    p.add_argument("--min-doc-freq", type=int, default=d.min_doc_freq,
                   help=f"documents a token must occur in (default {d.min_doc_freq})")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"most corpus token mass the filters may discard (default {d.tolerance})")
    p.add_argument("--scripts", default=None,
                   help="comma-separated Unicode scripts allowed for a token's letters, e.g. latin (default: no filter)")


def profile_options(args: argparse.Namespace) -> ProfileOptions:
    scripts = [s for s in args.scripts.split(",") if s.strip()] if args.scripts else None
    return ProfileOptions(min_doc_freq=args.min_doc_freq, tolerance=args.tolerance, scripts=scripts)

"""``overdrive calibrate --method pmkvq``: argparse glue (the pipeline is :mod:`.calibrate`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import add_device_arguments, check_device, load_for_calibration

from .config import CalibOptions
from .search import parse_budget


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers causal-LM checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="plan JSON to write (atomically)")
    p.add_argument("--budget", required=True,
                   help="KV memory for one --max-len sequence: e.g. 2GiB, 300MiB, or average bits per element: 3bpe")
    p.add_argument("--max-len", required=True, type=int, help="longest sequence the budget must hold (tokens)")
    p.add_argument("--bits", default="4,2", help="candidate final widths per layer, comma-separated (16,8,4,2)")
    p.add_argument("--window", type=int, default=128, help="full-precision recent window, flushed in chunks of it")
    p.add_argument("--sink", type=int, default=1, help="leading tokens kept at full precision")
    p.add_argument("--group-size", type=int, default=128, help="largest channel group per scale/zero")
    p.add_argument("--data", type=Path, default=None, help="calibration text (.txt, or .jsonl with 'text')")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-reparam", action="store_true", help="skip the key-scale search")
    add_device_arguments(p, dtype_default="float32")


def run(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, token_batches

    try:
        bits = tuple(int(x) for x in str(args.bits).split(",") if x.strip())
    except ValueError:
        print(f"overdrive calibrate: --bits {args.bits!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    try:
        opts = CalibOptions(max_len=args.max_len, budget=args.budget, candidate_bits=bits, group_size=args.group_size,
                            sink=args.sink, window=args.window, seq_len=args.seq_len, reparam=not args.no_reparam,
                            data=str(args.data) if args.data else "builtin")
        check_device(args.device)
        run = load_for_calibration(args.model, device=args.device, dtype=args.dtype,
                                   offload_activations=args.offload_activations)
        try:
            batches = token_batches(run.tokenizer, args.seq_len, args.samples, args.batch_size, args.data)
            plan = calibrate(run, batches, opts)
        finally:
            run.close()
    except ConfigError as e:
        print(f"overdrive calibrate --method pmkvq: {e}", file=sys.stderr)
        return 2
    plan.save(args.output)
    ident = plan.identity
    mean_bits = sum(plan.layer_bits) / len(plan.layer_bits)
    print(f"wrote {args.output}: {ident.architecture}, {ident.num_layers} layers, per-layer bits {plan.layer_bits} "
          f"(mean {mean_bits:.2f}), {plan.budget_bytes} of {parse_budget(args.budget, ident, args.max_len)} budget "
          f"bytes at max_len {plan.max_len}")
    return 0

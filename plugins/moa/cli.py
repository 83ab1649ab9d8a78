"""``overdrive calibrate --method moa``: argparse glue (the pipeline is :mod:`.calibrate`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import add_device_arguments, check_device, load_for_calibration

from .config import TARGETS, CalibOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers causal-LM checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="plan JSON to write (atomically)")
    p.add_argument("--density", type=float, default=0.5,
                   help="largest mean fraction of causal attention entries read, at every profile length and --max-len")
    p.add_argument("--max-len", type=int, default=0,
                   help="longest context the plan is for (density constraint there too); default min(model context, 16384)")
    p.add_argument("--lengths", default="", help="profile lengths, comma-separated (default: max-len/4, max-len/2)")
    p.add_argument("--validate-length", type=int, default=0, help="unseen validation length (default 3/4 max-len)")
    p.add_argument("--samples", type=int, default=2, help="calibration sequences per length")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--response-tokens", type=int, default=0,
                   help="tokens the dense model answers after each context; the loss is on them (default min(64, L/8))")
    p.add_argument("--target", choices=TARGETS, default="dense",
                   help="what the response tokens are: the dense model's greedy answer (MoA) or the text's own next tokens")
    p.add_argument("--sink", type=int, default=64, help="leading tokens every head reads")
    p.add_argument("--min-span", type=int, default=128, help="smallest span of any head")
    p.add_argument("--alpha-step", type=int, default=0, help="alpha grid step (default max-len/16)")
    p.add_argument("--betas", type=int, default=9, help="beta grid size over [0, 1]")
    p.add_argument("--data", type=Path, default=None, help="calibration text (.txt, or .jsonl with 'text')")
    add_device_arguments(p, dtype_default="float32")


def run(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    try:
        try:
            lengths = tuple(int(x) for x in str(args.lengths).split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--lengths {args.lengths!r}: expected comma-separated integers") from None
        opts = CalibOptions(density=args.density, max_len=args.max_len, lengths=lengths,
                            validate_length=args.validate_length, samples=args.samples, batch_size=args.batch_size,
                            response_tokens=args.response_tokens, target=args.target, sink=args.sink, min_span=args.min_span,
                            alpha_step=args.alpha_step, betas=args.betas, data=str(args.data) if args.data else "builtin")
        check_device(args.device)
        run = load_for_calibration(args.model, device=args.device, dtype=args.dtype,
                                   offload_activations=args.offload_activations)
        try:
            plan = calibrate(run, opts)
        finally:
            run.close()
    except ConfigError as e:
        print(f"overdrive calibrate --method moa: {e}", file=sys.stderr)
        return 2
    plan.save(args.output)
    ident = plan.identity
    cal = plan.calibration
    dens = ", ".join(f"{n}: {d:.3f}" for n, d in cal["density_at"].items())
    val = cal["validation"]
    moa_loss = val["plans"][val["chosen"]]["loss"]
    refs = ", ".join(f"{k} {v:.4f}" for k, v in val["uniform"].items())
    print(f"wrote {args.output}: {ident.architecture}, {ident.num_layers} layers x {ident.num_kv_heads} KV heads; density "
          f"{dens}; validation loss at {cal['validate_length']} tokens: best head-specific plan {moa_loss:.4f} "
          f"(dense {val['dense_loss']:.4f}, {len(val['plans'])} Pareto plan(s); uniform spans {refs or 'none fit'})")
    if val["result"] != "moa":
        print(f"overdrive calibrate --method moa: no head-specific plan beat a uniform span of the same reads at "
              f"{cal['validate_length']} tokens; wrote the {val['result']} plan (every head the same span)",
              file=sys.stderr)
    return 0

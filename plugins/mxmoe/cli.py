"""``overdrive quantize --method mxmoe``: argparse glue (the work is :mod:`.quantize`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from overdrive.contracts.llm_calibration import add_device_arguments

from .config import DEFAULT_CANDIDATES, QUANTIZERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers MoE checkpoint directory (safetensors, "
                                                              "per-expert tensors)")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--avg-bits", type=float, required=True,
                   help="budget: average storage bits per expert weight in every MoE layer (codes + scales/zeros)")
    p.add_argument("--quantizer", choices=QUANTIZERS, default="gptq", help="how codes are chosen (default gptq)")
    p.add_argument("--r", type=float, default=1.0,
                   help="trade-off of r*log(loss) + (1-r)*log(time): 1 = accuracy only (default), 0 = speed only")
    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                   help="comma-separated formats to choose from: w{2,3,4,8}g{32,64,128}, w8a8, w4a4")
    p.add_argument("--calib-data", type=Path, default=None,
                   help=".txt file/folder or jsonl records (as MBQ's --calib-data); default: a small built-in sample")
    p.add_argument("--samples", type=int, default=32, help="calibration text chunks")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration chunk")
    p.add_argument("--batch-tokens", type=int, default=256,
                   help="serving batch the time model prices each expert's share of (tokens)")
    add_device_arguments(p, dtype_default="auto")


def run(args: argparse.Namespace) -> int:
    from .method import METHOD
    from .quantize import quantize
    from .config import MxMoEConfig

    out = quantize(args.model, args.output, args.avg_bits, quantizer=args.quantizer, r=args.r,
                   candidates=[c.strip() for c in args.candidates.split(",") if c.strip()],
                   calib_data=args.calib_data, n_samples=args.samples, seq_len=args.seq_len,
                   batch_tokens=args.batch_tokens, device=args.device, dtype=args.dtype,
                   offload_activations=args.offload_activations,
                   progress=lambda m: print(m, file=sys.stderr))
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = MxMoEConfig.from_dict({k: v for k, v in qc.items() if k != "quant_method"})
    print(f"wrote {out}: {METHOD.summary(cfg)}")
    return 0

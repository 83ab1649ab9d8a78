"""``overdrive quantize --method mbq``: argparse glue (the work is :mod:`.quantize`)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import add_device_arguments, check_device

from .calibrate import SEARCH_TOKENS
from .config import MBQConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers checkpoint directory (safetensors)")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--bits", type=int, choices=(3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-bits", type=int, choices=(8, 16), default=16)
    p.add_argument("--baseline", choices=("rtn", "awq"), default=None,
                   help="rtn: round to nearest (no calibration); awq: uniform token weighting. Default: MBQ")
    p.add_argument("--calib-data", type=Path, default=None,
                   help='jsonl of {"image": path|null, "prompt": ..., "answer": ...} and/or {"text": ...} records, '
                        "or a .txt file or folder of .txt files (plain LLMs, as AWQ); default: a small built-in sample")
    p.add_argument("--samples", type=int, default=128,
                   help="calibration samples: text chunks, and at most this many image/prompt/answer records")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per text calibration chunk")
    p.add_argument("--format", choices=("mbq", "compressed-tensors"), default="mbq",
                   help="mbq: overdrive's format (vLLM/SGLang/transformers through overdrive); compressed-tensors: "
                        "the engines' own format and kernels (see `overdrive export --method mbq`)")
    p.add_argument("--search-scope", choices=("module", "linear"), default="module",
                   help="judge q,k,v / gate,up scales on the attention / MLP output (module, as AWQ) or on "
                        "their own linear outputs (linear)")
    p.add_argument("--loss", choices=("mae", "mse"), default="mae", help="reconstruction loss of the scale search")
    p.add_argument("--distort", action="store_true", help="calibrate each block on the quantized earlier blocks")
    p.add_argument("--search-tokens", type=int, default=SEARCH_TOKENS,
                   help="calibration tokens the scale-search loss is measured on (whole sequences spread over the "
                        "data; the channel statistics use every token); 0: every token")
    add_device_arguments(p, dtype_default="auto")


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    cfg = MBQConfig(bits=args.bits, group_size=args.group_size, act_bits=args.act_bits,
                    baseline=args.baseline or "mbq")
    kw = dict(calib_data=args.calib_data, loss_mode=args.loss, distort=args.distort, n_samples=args.samples,
              seq_len=args.seq_len, scope=args.search_scope, device=args.device, dtype=args.dtype,
              offload_activations=args.offload_activations, search_tokens=args.search_tokens)
    from .quantize import quantize

    if args.format == "mbq":
        out = quantize(args.model, args.output, cfg, **kw)
    else:
        from .export import export

        if Path(args.output).exists():
            raise ConfigError(f"{args.output}: already exists; choose a new --output directory")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".mbq-export-", dir=Path(args.output).parent) as tmp:
            out = export(quantize(args.model, Path(tmp) / "mbq", cfg, **kw), args.output, args.format)
    print(f"wrote {out} (mbq {cfg.scheme}, group {cfg.group_size}, {cfg.baseline}, format {args.format})")
    return 0

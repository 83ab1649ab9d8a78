"""``overdrive quantize --method mbq``: argparse glue (the work is :mod:`.quantize`)."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import add_device_arguments, check_device

from .calibrate import GPTQ_BASELINES, SEARCH_TOKENS, GPTQOptions
from .config import MBQConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers checkpoint directory (safetensors)")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--bits", type=int, choices=(3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-bits", type=int, choices=(8, 16), default=16)
    p.add_argument("--baseline", choices=("rtn", "awq", "gptq", "awq-gptq", "mbq-gptq"), default=None,
                   help="rtn: round to nearest (no calibration); awq: uniform token weighting; gptq: GPTQ; "
                        "awq-gptq / mbq-gptq: AWQ's / MBQ's scales, then GPTQ (mbq-gptq: the Hessians weight "
                        "vision and caption tokens as MBQ's loss does). Default: MBQ")
    p.add_argument("--rotate", choices=("none", "residual", "full"), default="none",
                   help="rotate before quantizing (QuaRot-style, for W4A8): residual: the residual stream by a random "
                        "Hadamard with the norms folded, and each head's values (offline: nothing at run time; "
                        "exports to compressed-tensors); full: also an online Hadamard on down_proj's inputs that "
                        "overdrive's runtime applies (not exportable). Llama/Qwen2-style LLMs, not VLMs")
    p.add_argument("--damp", type=float, default=None,
                   help="GPTQ dampening: fraction of the mean Hessian diagonal added to it (default 0.01)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups: same layout)")
    p.add_argument("--gptq-dtype", choices=("float64", "float32"), default=None,
                   help="dtype of GPTQ's Hessians and math (default float64; float32 is faster on GPUs with slow "
                        "float64)")
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


def gptq_options(args: argparse.Namespace, baseline: str) -> GPTQOptions | None:
    """GPTQ's options from the command line; GPTQ options with a baseline that runs no GPTQ are an error."""
    given = [f for f, v in (("--damp", args.damp), ("--act-order", args.act_order or None),
                            ("--gptq-dtype", args.gptq_dtype)) if v is not None]
    if baseline not in GPTQ_BASELINES:
        if given:
            raise ConfigError(f"{given[0]} is a GPTQ option; --baseline {baseline} runs no GPTQ (use --baseline "
                              f"{' / '.join(GPTQ_BASELINES)})")
        return None
    return GPTQOptions(percdamp=0.01 if args.damp is None else args.damp, act_order=args.act_order,
                       dtype=getattr(torch, args.gptq_dtype or "float64"))


def _rotation(args: argparse.Namespace) -> int:
    """Check ``--rotate`` against the checkpoint's config.json before any work; the online block."""
    if args.rotate == "none":
        return 0
    from .rotation import check_rotation

    path = Path(args.model) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--model {args.model}: no config.json (expected a transformers checkpoint directory)")
    conf = json.loads(path.read_text())
    text = conf.get("text_config") or conf
    online = check_rotation(args.rotate, text.get("intermediate_size"), "vision_config" in conf,
                            str(args.model))
    if online and args.format != "mbq":
        raise ConfigError(f"--rotate full adds an online Hadamard that --format {args.format} cannot hold; use "
                          "--rotate residual, or --format mbq (served through overdrive)")
    return online


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    baseline = args.baseline or "mbq"
    online = _rotation(args)
    cfg = MBQConfig(bits=args.bits, group_size=args.group_size, act_bits=args.act_bits, baseline=baseline,
                    rotation=args.rotate, online_hadamard=online)
    kw = dict(calib_data=args.calib_data, loss_mode=args.loss, distort=args.distort, n_samples=args.samples,
              seq_len=args.seq_len, scope=args.search_scope, device=args.device, dtype=args.dtype,
              offload_activations=args.offload_activations, search_tokens=args.search_tokens,
              gptq_opts=gptq_options(args, baseline))
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

"""argparse glue of ``overdrive quantize --method pcdvq``."""
from __future__ import annotations

import argparse
from pathlib import Path

from overdrive.config import ConfigError

#: --bits -> direction bits (with 2 magnitude bits)
BITS = {"2": 14, "2.0": 14, "2.125": 15, "2.25": 16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers checkpoint directory (safetensors)")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--bits", default="2", choices=sorted(BITS),
                   help="code bits per weight: 2 (2^14 directions + 2-bit magnitudes), 2.125 (2^15), 2.25 (2^16)")
    p.add_argument("--direction-bits", type=int, default=None, help="override: log2 of the direction codebook size")
    p.add_argument("--magnitude-bits", type=int, default=2, choices=(1, 2, 4))
    p.add_argument("--hadamard-block", type=int, default=None,
                   help="Hadamard block along input features (default: the largest multiple of 8 up to 512 dividing "
                        "every quantized layer's input features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hessian", action="store_true",
                   help="Hessian-aware assignment (GPTQ-style VQ): calibrate on --calib text and quantize 8-column "
                        "groups in order with error feedback to the columns not yet quantized")
    p.add_argument("--calib", type=Path, default=None,
                   help="with --hessian (required): a UTF-8 text file of calibration text")
    p.add_argument("--calib-samples", type=int, default=32, help="with --hessian: calibration sequences")
    p.add_argument("--calib-len", type=int, default=512, help="with --hessian: tokens per calibration sequence")
    p.add_argument("--percdamp", type=float, default=0.01,
                   help="with --hessian: dampening added to the Hessian diagonal, times its mean")
    from overdrive.contracts.llm_calibration import add_device_arguments

    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    from overdrive.contracts.llm_calibration import check_device

    from .config import PCDVQConfig
    from .quantize import auto_block, quantize, quantized_shapes

    device = check_device(args.device)
    k = args.direction_bits if args.direction_bits is not None else BITS[args.bits]
    block = args.hadamard_block
    if block is None:
        block = auto_block(quantized_shapes(args.model, PCDVQConfig(direction_bits=k)))
    cfg = PCDVQConfig(direction_bits=k, magnitude_bits=args.magnitude_bits, hadamard_block=block, seed=args.seed)
    if not Path(args.model).is_dir():
        raise ConfigError(f"{args.model}: not a directory; --model must be a transformers checkpoint directory")
    hessian = None
    if args.hessian:
        from .calibrate import HessianOptions

        if args.calib is None:
            raise ConfigError("--hessian needs --calib FILE (calibration text)")
        if args.percdamp < 0:
            raise ConfigError(f"--percdamp must be >= 0, got {args.percdamp}")
        hessian = HessianOptions(args.calib, args.calib_samples, args.calib_len, args.dtype,
                                 args.offload_activations, args.percdamp)
    out = quantize(args.model, args.output, cfg, device=device, hessian=hessian)
    print(f"wrote {out} (pcdvq{' hessian-aware' if args.hessian else ''}: 2^{cfg.direction_bits} directions, {cfg.magnitude_bits}-bit magnitudes, "
          f"{cfg.bits_per_weight:g} bits/weight, Hadamard block {cfg.hadamard_block})")
    return 0

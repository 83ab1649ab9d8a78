"""Writing a PCDVQ checkpoint (round to the nearest codewords, no calibration)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from overdrive.checkpoint import atomic_directory, check_finite, checkpoint_shards, rewrite_checkpoint
from overdrive.config import ConfigError

from .codebook import codebook_digest, lloyd_max_chi
from .config import PCDVQConfig
from .method import METHOD, NAME
from .quantizer import check_shape, quantize_weight
from .runtime import load_codebook

if TYPE_CHECKING:
    from .calibrate import HessianOptions

#: largest default Hadamard block
MAX_AUTO_BLOCK = 512


def is_target(name: str, t: torch.Tensor, cfg: PCDVQConfig) -> bool:
    return name.endswith("_proj.weight") and t.dim() == 2 and METHOD.is_quantized_layer(name.removesuffix(".weight"), cfg)


def quantized_shapes(model: Path, cfg: PCDVQConfig) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for shard in checkpoint_shards(model):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if name.endswith("_proj.weight") and len(shape) == 2 and \
                        METHOD.is_quantized_layer(name.removesuffix(".weight"), cfg):
                    out[name] = shape
    return out


def auto_block(shapes: dict[str, tuple[int, ...]]) -> int:
    """The largest divisor of every quantized layer's input features that is a multiple of 8 and at most
    MAX_AUTO_BLOCK."""
    g = 0
    for s in shapes.values():
        g = math.gcd(g, s[1])
    best = 0
    for b in range(8, min(g, MAX_AUTO_BLOCK) + 1, 8):
        if g % b == 0:
            best = b
    if not best:
        raise ConfigError(f"PCDVQ: the quantized layers' input features ({sorted({s[1] for s in shapes.values()})}) "
                          "have no common divisor that is a multiple of 8; no Hadamard block fits")
    return best


def quantize(model: Path, output: Path, cfg: PCDVQConfig, device: str | None = None,
             hessian: "HessianOptions | None" = None) -> Path:
    """Quantize ``model``'s linear layers (``*_proj.weight``, not ``modules_to_not_convert``) into ``output``;
    the direction assignment is scored on ``device`` (default CPU). ``hessian``: Hessian-aware assignment
    (overdrive.pcdvq.calibrate) for the linears of the decoder blocks, calibrated on ``device``."""
    model, output = Path(model), Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; choose a new --output directory")
    shapes = quantized_shapes(model, cfg)
    if not shapes:
        raise ConfigError(f"{model}: no linear layers (*_proj.weight) to quantize")
    for name, shape in shapes.items():
        check_shape(name, shape, cfg)
    cb = load_codebook(cfg)
    cfg.codebook_digest = codebook_digest(cb)
    precomputed: dict[str, dict[str, torch.Tensor]] = {}
    if hessian is not None:
        from .calibrate import hessian_codes

        precomputed = hessian_codes(model, shapes, cfg, cb, hessian, device)

    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if not is_target(name, t, cfg):
            return {name: t}
        check_finite(name, t)
        prefix = name.removesuffix(".weight")
        q = precomputed.get(name) or quantize_weight(name, t, cfg, cb, device)
        return {f"{prefix}.{k}": v for k, v in q.items()}

    with atomic_directory(output) as tmp:
        inner = rewrite_checkpoint(model, tmp / "ckpt", transform, {"quant_method": NAME, **cfg.to_dict()},
                                   desc=f"pcdvq {cfg.direction_bits}+{cfg.magnitude_bits} bits")
        for f in inner.iterdir():
            os.rename(f, tmp / f.name)
        shutil.rmtree(inner)
        from safetensors.torch import save_file

        (tmp / "pcdvq").mkdir()
        levels, _ = lloyd_max_chi(cfg.magnitude_bits)
        save_file({"directions": cb, "magnitudes": torch.from_numpy(levels).float()},
                  str(tmp / "pcdvq" / "codebooks.safetensors"),
                  metadata={"format": "pt", "codebook_digest": cfg.codebook_digest,
                            "config": json.dumps(cfg.to_dict())})
    return output

"""int8 weight-only round-to-nearest: the weight-quantization contract in ~100 lines.

Checkpoint format (per quantized linear layer ``P``): ``P.qweight`` int8 (out, in) and ``P.scale``
float32 (out,), with ``W ≈ qweight * scale[:, None]``, ``scale = max|W_row| / 127``. config.json gets
``quantization_config = {"quant_method": "example_w8", "version": 1, "skip": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from overdrive.contracts import ParamSpec, WeightQuantMethod
from overdrive.contracts.weight_quant import check_quant_method
from overdrive.kernels import int8_weight_linear
from overdrive.checkpoint import rewrite_checkpoint

from .configs import W8Config

NAME = "example_w8"


def quantize_rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 RTN of a (out, in) weight; returns (qweight, scale)."""
    w32 = w.detach().to(torch.float32)
    scale = w32.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class W8Method(WeightQuantMethod):
    def config_from_checkpoint(self, quantization_config: Mapping[str, Any]) -> W8Config:
        check_quant_method(quantization_config, NAME)
        data = {k: v for k, v in quantization_config.items() if k != "quant_method"}
        return W8Config.from_dict(data, source="config.json quantization_config")

    def is_quantized_layer(self, prefix: str, cfg: W8Config) -> bool:
        return not any(s in prefix for s in cfg.skip)

    def param_specs(self, in_features: int, out_features: int, cfg: W8Config) -> list[ParamSpec]:
        return [
            ParamSpec("qweight", (out_features, in_features), torch.int8, output_dim=0, input_dim=1),
            ParamSpec("scale", (out_features,), torch.float32, output_dim=0),
        ]

    def apply(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], bias: torch.Tensor | None,
              cfg: W8Config) -> torch.Tensor:
        return int8_weight_linear(x, params["qweight"], params["scale"], bias)


METHOD = W8Method()


# ------------------------------------------------------------------------- overdrive quantize
def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--skip", nargs="*", default=None, help="module-name substrings left in 16/32 bits")


def run_quantize(args: argparse.Namespace) -> int:
    cfg = W8Config() if args.skip is None else W8Config(skip=list(args.skip))
    quantize_checkpoint(args.model, args.output, cfg)
    print(f"wrote {args.output} ({NAME})")
    return 0


def quantize_checkpoint(model: Path, output: Path, cfg: W8Config) -> Path:
    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = name.removesuffix(".weight")
        if name.endswith("_proj.weight") and t.dim() == 2 and METHOD.is_quantized_layer(prefix, cfg):
            q, s = quantize_rtn(t)
            return {f"{prefix}.qweight": q, f"{prefix}.scale": s}
        return {name: t}

    return rewrite_checkpoint(model, output, transform, {"quant_method": NAME, **cfg.to_dict()}, desc=NAME)


def dequantize_checkpoint(quantized: Path, output: Path) -> Path:
    """Write a plain float32 checkpoint with ``W = qweight * scale`` (a reference for comparisons)."""
    quantized, output = Path(quantized), Path(output)
    tensors = load_file(quantized / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            out[f"{prefix}.weight"] = t.to(torch.float32) * tensors[f"{prefix}.scale"][:, None]
        elif not name.endswith(".scale"):
            out[name] = t
    output.mkdir(parents=True, exist_ok=False)
    for f in quantized.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, output / f.name)
    save_file(out, str(output / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((output / "config.json").read_text())
    conf.pop("quantization_config", None)
    (output / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return output

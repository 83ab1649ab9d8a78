"""Export an MBQ checkpoint to the compressed-tensors layout, so engines load it with their own kernels.

    overdrive export --method mbq --model MBQ_CHECKPOINT --output DIR [--format compressed-tensors]
    overdrive quantize --method mbq ... --format compressed-tensors

The codes, scales and zero points are the MBQ checkpoint's (no re-rounding); only the layout and the
``quantization_config`` change (compressed-tensors 0.17 field names, ``quant_method:
"compressed-tensors"``). Per scheme (``P`` a quantized linear layer with weight (N out, K in)):

===========  =================  ==========================================================================
W4 / W3      ``pack-quantized``  ``P.weight_packed`` int32 (N, ceil(K*bits/32)): unsigned codes as one
(A16, asym.  weights int,        little-endian bit stream per row (code k at bits [bits*k, bits*(k+1));
group g)     group g,            for 3 bits this is the dense packing vLLM 0.32 reads, not the 10-codes-
             symmetric false     per-word packing of compressed-tensors' own ``pack_to_int32``);
                                 ``P.weight_scale`` (N, K/g) in the model dtype; ``P.weight_zero_point``
                                 int32 (ceil(N*bits/32), K/g): unsigned zero codes packed the same way
                                 along N; ``P.weight_shape`` int64 [N, K]. W = (code - zero) * scale.
W8A8         ``int-quantized``   ``P.weight`` int8 (N, K); ``P.weight_scale`` float32 (N, 1); weights
                                 int8 channel symmetric, input activations int8 per-token dynamic symmetric
W4A8         ``int-quantized``   ``P.weight`` int8 (N, K) holding the int4 codes in [-7, 7];
                                 ``P.weight_scale`` float32 (N, 1); weights int4 channel symmetric,
                                 input activations int8 per-token dynamic symmetric
===========  =================  ==========================================================================

MBQ's packing (overdrive.kernels.packing) stores 3-bit codes in groups of 32 codes per 3 words; as a
bit stream that is the same sequence of bits, so a row's dense words are its first ceil(K*3/32) words.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from overdrive.checkpoint import checkpoint_shards, rewrite_checkpoint
from overdrive.config import ConfigError
from overdrive.kernels import pack, unpack

from .config import MBQConfig
from .method import METHOD, NAME

FORMATS = ("compressed-tensors",)
#: compressed-tensors version whose layout this writes (recorded in quantization_config.version)
CT_VERSION = "0.17.0"


def dense_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes (..., n) -> int32 (..., ceil(n*bits/32)): one little-endian bit
    stream per row (code i at bits [bits*i, bits*(i+1)))."""
    n = codes.shape[-1]
    return pack(codes, bits)[..., : -(-n * bits // 32)]


def _int(bits: int, strategy: str, symmetric: bool, group_size: int | None = None) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": False, "observer": "minmax", "actorder": None,
            "block_structure": None, "observer_kwargs": {}}


def _token_int8() -> dict[str, Any]:
    return {**_int(8, "token", True), "dynamic": True, "observer": None}


def quantization_config(cfg: MBQConfig, ignore: list[str]) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` for an MBQ scheme."""
    if cfg.act_bits == 16:
        fmt = "pack-quantized"
        group = {"weights": _int(cfg.bits, "group", False, cfg.group_size), "input_activations": None}
    else:
        fmt = "int-quantized"
        group = {"weights": _int(cfg.bits, "channel", True), "input_activations": _token_int8()}
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": None, "format": fmt, **group}},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
        "transform_config": {}, "version": CT_VERSION,
        # provenance (ignored by loaders): how the codes were chosen
        "overdrive": {"method": NAME, "scheme": cfg.scheme, "baseline": cfg.baseline, "rotation": cfg.rotation},
    }


def _mbq_config(model: Path) -> MBQConfig:
    conf = json.loads((model / "config.json").read_text())
    qc = conf.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != NAME:
        raise ConfigError(f"{model / 'config.json'}: quantization_config.quant_method is "
                          f"{(qc or {}).get('quant_method')!r}, expected {NAME!r} (an `overdrive quantize --method "
                          f"mbq` checkpoint)")
    return METHOD.config_from_checkpoint(qc)


def _model_dtype(model: Path) -> torch.dtype:
    conf = json.loads((model / "config.json").read_text())
    name = conf.get("dtype") or conf.get("torch_dtype") or (conf.get("text_config") or {}).get("dtype") or "float32"
    dt = getattr(torch, str(name), None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def check_exportable(cfg: MBQConfig, model: str) -> None:
    """compressed-tensors holds no online rotation (``--rotate full``): refuse before any work."""
    if cfg.online_hadamard:
        raise ConfigError(f"{model}: rotated with an online Hadamard before down_proj (--rotate full), which engines "
                          "reading compressed-tensors do not apply; serve it through overdrive (--quantization mbq), "
                          "or quantize with --rotate residual (offline rotation only), which exports")


def export_compressed_tensors(model: Path, output: Path) -> Path:
    """Write ``output`` (must not exist): the MBQ checkpoint ``model`` in the compressed-tensors layout."""
    from safetensors import safe_open

    model, output = Path(model), Path(output)
    cfg = _mbq_config(model)
    check_exportable(cfg, str(model))
    dtype = _model_dtype(model)
    where: dict[str, Path] = {}
    for shard in checkpoint_shards(model):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                where[k] = shard

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise ConfigError(f"{model}: tensor {name!r} is missing (an MBQ {cfg.scheme} layer needs it)")
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    quantized = {k.removesuffix(".qweight") for k in where if k.endswith(".qweight")}
    # linear layers MBQ left in 16 bits (LM head, vision tower, projector) stay unquantized: every
    # other 2-D ".weight" except embeddings (compressed-tensors' targets are Linear modules only)
    ignore = {"lm_head"}
    for k in where:
        if k.endswith(".weight") and "embed" not in k and k.removesuffix(".weight") not in quantized:
            with safe_open(str(where[k]), framework="pt") as f:
                if len(f.get_slice(k).get_shape()) == 2:
                    ignore.add(k.removesuffix(".weight"))

    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix, _, leaf = name.rpartition(".")
        if prefix not in quantized:
            return {name: t}
        if leaf in ("scales", "zeros"):
            return {}  # written with the layer's qweight
        if leaf != "qweight":
            return {name: t}  # e.g. a bias
        scales = get(f"{prefix}.scales")
        n = t.shape[0]
        if cfg.act_bits == 8:
            k = t.shape[1] if cfg.bits == 8 else t.shape[1] * 8
            codes = t if cfg.bits == 8 else (unpack(t, 4, k).to(torch.int16) - 8).to(torch.int8)
            return {f"{prefix}.weight": codes.contiguous(),
                    f"{prefix}.weight_scale": scales.to(torch.float32).reshape(n, 1)}
        zeros = get(f"{prefix}.zeros")
        k = scales.shape[1] * cfg.group_size
        codes = unpack(t, cfg.bits, k)
        return {f"{prefix}.weight_packed": dense_pack(codes, cfg.bits),
                f"{prefix}.weight_scale": scales.to(dtype),
                f"{prefix}.weight_zero_point": dense_pack(zeros.to(torch.int64).T.contiguous(), cfg.bits).T.contiguous(),
                f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}

    return rewrite_checkpoint(model, output, transform, quantization_config(cfg, sorted(ignore)),
                              desc=f"export mbq {cfg.scheme} -> compressed-tensors")


def export(model: Path, output: Path, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    return export_compressed_tensors(model, output)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="an MBQ checkpoint (overdrive quantize --method mbq)")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors")


def run(args: argparse.Namespace) -> int:
    out = export(args.model, args.output, args.format)
    print(f"wrote {out} ({args.format})")
    return 0


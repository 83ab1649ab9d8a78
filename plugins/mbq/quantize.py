"""``overdrive quantize --method mbq``: write an MBQ-format checkpoint.

``--baseline rtn`` rounds the float weights to nearest; ``awq`` / ``mbq`` (default) first search and
fold AWQ-style scales on calibration data (:mod:`.calibrate`), then round. Options are checked
against the checkpoint's tensor shapes before any calibration, and the output is written atomically.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from overdrive.checkpoint import check_finite, checkpoint_shards, rewrite_checkpoint
from overdrive.config import ConfigError
from overdrive.kernels import pack

from .config import MBQConfig
from .method import METHOD, NAME


def rtn_codes(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric group quantization of a (N, K) weight.

    Returns float32 (codes (N, K/g, g), scales (N, K/g), zeros (N, K/g)) with
    ``W ~ (codes - zeros) * scales`` per group.
    """
    n, k = w.shape
    if k % group_size:
        raise ConfigError(f"{k} input features are not a multiple of group size {group_size}")
    qmax = (1 << bits) - 1
    g = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    wmin = g.amin(dim=2).clamp(max=0.0)
    wmax = g.amax(dim=2).clamp(min=0.0)
    scales = ((wmax - wmin) / qmax).clamp(min=1e-8)
    zeros = torch.round(-wmin / scales).clamp(0, qmax)
    codes = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, qmax)
    return codes, scales, zeros


def rtn_per_channel_symmetric(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel RTN: (signed codes float32 (N, K), scales float32 (N,))."""
    qmax = (1 << (bits - 1)) - 1  # 127 for 8 bits, 7 for 4 bits
    w32 = w.detach().to(torch.float32)
    scales = (w32.abs().amax(dim=1) / qmax).clamp(min=1e-8)
    codes = torch.clamp(torch.round(w32 / scales[:, None]), -qmax, qmax)
    return codes, scales


def act8_tensors(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """W8A8/W4A8 checkpoint tensors from signed codes (N, K) and per-channel scales (N,)."""
    q = codes.to(torch.int8) if bits == 8 else pack((codes.to(torch.int64) + 8), 4)
    return {"qweight": q, "scales": scales.to(torch.float16)}


def group_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Weight-only checkpoint tensors qweight/scales/zeros from unsigned codes (N, K) and per-group
    scales / zero points (N, K/g)."""
    return {"qweight": pack(codes.to(torch.int64), bits), "scales": scales.to(torch.float16),
            "zeros": zeros.to(torch.uint8)}


def rtn_act8_tensors(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """W8A8/W4A8 checkpoint tensors of a (N, K) weight."""
    return act8_tensors(*rtn_per_channel_symmetric(w, bits), bits)


def rtn_group_asymmetric(w: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """RTN of a (N, K) weight into the checkpoint tensors qweight/scales/zeros."""
    codes, scales, zeros = rtn_codes(w, bits, group_size)
    return group_tensors(codes.reshape(w.shape), scales, zeros, bits)


def quantized_shapes(model: Path, cfg: MBQConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the checkpoint's weights that ``cfg`` quantizes (read from safetensors headers only)."""
    from safetensors import safe_open

    out = {}
    for shard in checkpoint_shards(model):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.endswith("_proj.weight") and METHOD.is_quantized_layer(name.removesuffix(".weight"), cfg):
                    shape = tuple(f.get_slice(name).get_shape())
                    if len(shape) == 2:
                        out[name] = shape
    return out


def check_group_size(model: Path, cfg: MBQConfig) -> None:
    """Reject a ``group_size`` that does not divide every quantized layer's input features, naming a
    layer that fails and the group sizes that divide them all (before any calibration runs)."""
    if cfg.act_bits == 8:
        return
    shapes = quantized_shapes(model, cfg)
    bad = {n: s for n, s in shapes.items() if s[1] % cfg.group_size}
    if not bad:
        return
    k_all = sorted({s[1] for s in shapes.values()})
    g = math.gcd(*k_all)
    ok = [d for d in range(32, g + 1, 32) if g % d == 0]
    name, shape = next(iter(bad.items()))
    hint = (f"group sizes that divide every layer's input features ({', '.join(map(str, k_all))}): "
            f"{', '.join(map(str, ok))}") if ok else \
        f"no multiple of 32 divides every layer's input features ({', '.join(map(str, k_all))})"
    raise ConfigError(f"--group-size {cfg.group_size} does not divide the {shape[1]} input features of {name} "
                      f"{shape} ({len(bad)} of {len(shapes)} quantized layers); {hint}")


def quantize(model: Path, output: Path, cfg: MBQConfig, calib_data: Path | None = None,
             loss_mode: str = "mae", distort: bool = False, n_samples: int = 128, seq_len: int = 512,
             scope: str = "module", gptq_opts: Any = None) -> Path:
    """Quantize a transformers checkpoint's language-decoder linear layers into ``output``.

    ``cfg.baseline``: "rtn" writes round-to-nearest codes directly; "awq" / "mbq" first calibrate
    (search and fold scales on the float model, see :mod:`.calibrate`), then round to nearest;
    "gptq" / "awq-gptq" / "mbq-gptq" write the codes GPTQ chose during calibration.
    """
    model, output = Path(model), Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; choose a new --output directory")
    check_group_size(model, cfg)
    if cfg.baseline != "rtn" or cfg.rotation != "none":
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".mbq-calibrated-", dir=output.parent) as tmp:
            _calibrated_copy(model, Path(tmp), cfg, calib_data, loss_mode, distort, n_samples, seq_len, scope,
                             gptq_opts)
            return _write(Path(tmp), output, cfg)
    return _write(model, output, cfg)


def _calibrated_copy(model_dir: Path, out: Path, cfg: MBQConfig, calib_data: Path | None, loss_mode: str,
                     distort: bool, n_samples: int = 128, seq_len: int = 512, scope: str = "module",
                     gptq_opts: Any = None) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from .calibrate import calibrate
    from .data import build_calibration, builtin_records, load_records

    checkpoint_shards(model_dir)  # clear error for a folder that is not a safetensors checkpoint
    conf = AutoConfig.from_pretrained(model_dir)
    is_vlm = hasattr(conf, "vision_config")
    processor = AutoProcessor.from_pretrained(model_dir)
    records = load_records(calib_data) if calib_data is not None else builtin_records(with_images=is_vlm)
    vision_ids = [getattr(conf, k) for k in ("image_token_id", "video_token_id") if getattr(conf, k, None) is not None]
    samples = build_calibration(processor, records, vision_ids, n_samples=n_samples, seq_len=seq_len)
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    # weights stay in the checkpoint's dtype (16-bit checkpoints: half the memory of float32); the
    # block under search runs in float32 (calibrate.search_and_fold)
    model = auto.from_pretrained(model_dir, dtype="auto")
    if cfg.rotation != "none":
        from .rotation import rotate_model

        info = rotate_model(model, cfg.rotation)
        if info["online_hadamard"] != cfg.online_hadamard:
            raise ConfigError(f"--rotate {cfg.rotation}: the model's online Hadamard block is {info['online_hadamard']}, "
                              f"the config says {cfg.online_hadamard}")
    calibrate(model, samples, cfg, loss_mode=loss_mode, distort=distort, scope=scope, gptq_opts=gptq_opts)
    model.save_pretrained(out)
    processor.save_pretrained(out)

def _tensor_index(model: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = {}
    for shard in checkpoint_shards(model):
        with safe_open(str(shard), framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), shard))
    return index


def _read(index: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(index[name]), framework="pt") as f:
        return f.get_tensor(name)


def _write(model: Path, output: Path, cfg: MBQConfig) -> Path:
    from .calibrate import GPTQ_BUFFERS

    index = _tensor_index(model)

    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if name.rsplit(".", 1)[-1] in GPTQ_BUFFERS:
            return {}  # packed into the layer's tensors below
        prefix = name.removesuffix(".weight")
        if not (name.endswith("_proj.weight") and t.dim() == 2 and METHOD.is_quantized_layer(prefix, cfg)):
            return {name: t}
        check_finite(name, t)
        if f"{prefix}.gptq_codes" in index:  # GPTQ's own codes, scales and zero points
            codes, scales, zeros = (_read(index, f"{prefix}.{b}") for b in GPTQ_BUFFERS)
            if tuple(codes.shape) != tuple(t.shape):
                raise ConfigError(f"{prefix}.gptq_codes {tuple(codes.shape)} does not match {name} {tuple(t.shape)}")
            if cfg.act_bits == 8:
                return {f"{prefix}.{k}": v for k, v in act8_tensors(codes, scales, cfg.bits).items()}
            return {f"{prefix}.{k}": v for k, v in group_tensors(codes, scales, zeros, cfg.bits).items()}
        if cfg.baseline.endswith("gptq"):
            raise ConfigError(f"{name}: GPTQ calibration left no codes for this layer")
        if cfg.act_bits == 8:
            return {f"{prefix}.{k}": v for k, v in rtn_act8_tensors(t, cfg.bits).items()}
        if t.shape[1] % cfg.group_size:
            raise ConfigError(f"tensor {name!r} {tuple(t.shape)}: {t.shape[1]} input features are not a multiple "
                              f"of --group-size {cfg.group_size}")
        return {f"{prefix}.{k}": v for k, v in rtn_group_asymmetric(t, cfg.bits, cfg.group_size).items()}

    return rewrite_checkpoint(model, output, transform, {"quant_method": NAME, **cfg.to_dict()},
                              desc=f"mbq {cfg.scheme} ({cfg.baseline})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers checkpoint directory (safetensors)")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    p.add_argument("--bits", type=int, choices=(3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-bits", type=int, choices=(8, 16), default=16)
    p.add_argument("--baseline", choices=("rtn", "awq", "gptq", "awq-gptq", "mbq-gptq"), default=None,
                   help="rtn: round to nearest (no calibration); awq: uniform token weighting; gptq: GPTQ; "
                        "awq-gptq / mbq-gptq: AWQ's / MBQ's scales, then GPTQ (mbq-gptq: modality-weighted "
                        "Hessian). Default: MBQ")
    p.add_argument("--rotate", choices=("none", "residual", "full"), default="none",
                   help="rotate before quantizing (for W4A8/W4A4): residual: the residual stream by a random "
                        "Hadamard, norms folded (offline; exports to compressed-tensors); full: also an online "
                        "Hadamard before down_proj that overdrive's runtime applies")
    p.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ dampening: fraction of the mean Hessian diagonal added to it")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups: same layout)")
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


def _intermediate_size(model: Path) -> int:
    import json

    conf = json.loads((checkpoint_shards(model) and model / "config.json").read_text())
    size = conf.get("intermediate_size") or (conf.get("text_config") or {}).get("intermediate_size")
    if not isinstance(size, int):
        raise ConfigError(f"{model / 'config.json'}: no intermediate_size (needed by --rotate full)")
    return size


def run(args: argparse.Namespace) -> int:
    online = 0
    if args.rotate == "full":
        from .rotation import online_block

        online = online_block(_intermediate_size(Path(args.model)))
    cfg = MBQConfig(bits=args.bits, group_size=args.group_size, act_bits=args.act_bits,
                    baseline=args.baseline or "mbq", rotation=args.rotate, online_hadamard=online)
    from .calibrate import GPTQOptions

    if not 0 <= args.damp < 1:
        raise ConfigError(f"--damp must be in [0, 1), got {args.damp}")
    kw = dict(calib_data=args.calib_data, loss_mode=args.loss, distort=args.distort, n_samples=args.samples,
              seq_len=args.seq_len, scope=args.search_scope,
              gptq_opts=GPTQOptions(percdamp=args.damp, act_order=args.act_order))
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

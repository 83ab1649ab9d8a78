"""``overdrive quantize --method mxmoe``: calibrate (:mod:`.calibrate`) and write an MxMoE checkpoint.

The checkpoint is the source's safetensors with every MoE expert linear ``...experts.{e}.{proj}.weight``
replaced by its format's tensors (:mod:`.quant`) and config.json ``quantization_config`` =
``{"quant_method": "mxmoe", **plan}`` (:class:`.config.MxMoEConfig`), written atomically; the Pareto
sweep and per-layer frequencies go to ``mxmoe_plan.json`` next to it.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from overdrive.checkpoint import checkpoint_shards, rewrite_checkpoint
from overdrive.config import ConfigError, atomic_write_text
from overdrive.contracts.llm_calibration import check_device, load_for_calibration

from .calibrate import LayerResult, calibrate
from .config import CHECKPOINT_LINEARS, DEFAULT_CANDIDATES, LINEARS, MxMoEConfig, parse_format
from .costs import CostTable
from .method import NAME

_EXPERT = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.([A-Za-z0-9_]+)\.weight$")


def plan_from_results(ident: dict[str, Any], results: Sequence[LayerResult], avg_bits: float, quantizer: str,
                      r: float, cost_device: str) -> MxMoEConfig:
    formats = {}
    pareto = []
    for res in results:
        formats[str(res.layer)] = {str(e): {lin: None for lin in LINEARS} for e in range(len(res.frequency))}
        cands = res.candidates
        for b, c in enumerate(res.choice.choice):
            formats[str(res.layer)][str(b // 3)][LINEARS[b % 3]] = cands[c]
        pareto.append({"layer": res.layer, "points": [{"r": a.r, "loss": a.loss, "time": a.time,
                                                        "avg_bits": a.avg_bits} for a in res.front]})
    return MxMoEConfig(avg_bits=float(avg_bits), quantizer=quantizer, r=float(r), identity=ident, formats=formats,
                       pareto=pareto, cost_device=cost_device)


def write_checkpoint(model: Path, output: Path, cfg: MxMoEConfig,
                     tensors: dict[tuple[int, int, str], dict[str, torch.Tensor]]) -> Path:
    """Rewrite ``model`` into ``output`` with the experts' quantized tensors (atomic)."""
    layers = {int(l) for l in cfg.identity["moe_layers"]}
    seen: set[tuple[int, int, str]] = set()

    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        m = _EXPERT.search(name)
        if not m or int(m.group(1)) not in layers or m.group(3) not in CHECKPOINT_LINEARS:
            return {name: t}
        key = (int(m.group(1)), int(m.group(2)), CHECKPOINT_LINEARS[m.group(3)])
        if key not in tensors:
            raise ConfigError(f"{name}: no quantized tensors for layer {key[0]} expert {key[1]} {key[2]}")
        seen.add(key)
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.{k}": v.contiguous() for k, v in tensors[key].items()}

    out = rewrite_checkpoint(model, output, transform, {"quant_method": NAME, **cfg.to_dict()},
                             desc=f"mxmoe {cfg.avg_bits} bits")
    missing = sorted(set(tensors) - seen)
    if missing:  # the checkpoint stores experts differently (e.g. fused): nothing was replaced
        import shutil

        shutil.rmtree(out)
        raise ConfigError(f"{model}: no per-expert tensors ...experts.{{e}}.{{proj}}.weight found for "
                          f"{len(missing)} expert linears (e.g. layer {missing[0][0]} expert {missing[0][1]} "
                          f"{missing[0][2]}); mxmoe reads per-expert checkpoints")
    return out


def quantize(model: Path, output: Path, avg_bits: float, *, quantizer: str = "gptq", r: float = 1.0,
             candidates: Sequence[str] = DEFAULT_CANDIDATES, calib_data: Path | None = None, n_samples: int = 32,
             seq_len: int = 256, batch_tokens: int = 256, device: str | None = None, dtype: str = "auto",
             offload_activations: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    from overdrive.mbq.data import build_calibration, builtin_records, load_records

    model, output = Path(model), Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; choose a new --output directory")
    for c in candidates:
        parse_format(c, "--candidates")
    if quantizer not in ("rtn", "gptq"):
        raise ConfigError(f"--quantizer {quantizer!r}: expected rtn or gptq")
    checkpoint_shards(model)
    device = check_device(device)
    run = load_for_calibration(model, device=device, dtype=dtype, offload_activations=offload_activations,
                               compute_dtype=torch.float32)
    try:
        geo = run.geometry
        records = load_records(calib_data) if calib_data is not None else builtin_records(with_images=False)
        samples = build_calibration(run.processor, records, list(geo.vision_token_ids), n_samples=n_samples,
                                    seq_len=seq_len)
        costs = CostTable(run.device, torch.float32)
        ident, results = calibrate(run, [s.inputs for s in samples], list(candidates), quantizer, avg_bits, r,
                                   costs, batch_tokens, progress)
    finally:
        run.close()
    cfg = plan_from_results(ident, results, avg_bits, quantizer, r, costs.device_name)
    tensors = {(res.layer, e, lin): t for res in results for (e, lin), t in res.tensors.items()}
    out = write_checkpoint(model, output, cfg, tensors)
    report = {"method": NAME, "avg_bits": avg_bits, "quantizer": quantizer, "r": r, "candidates": list(candidates),
              "cost_device": costs.device_name,
              "layers": [{"layer": res.layer, "frequency": res.frequency, "avg_bits": res.choice.avg_bits,
                          "loss": res.choice.loss, "time": res.choice.time,
                          "pareto": [{"r": a.r, "loss": a.loss, "time": a.time, "avg_bits": a.avg_bits}
                                     for a in res.front]} for res in results]}
    atomic_write_text(out / "mxmoe_plan.json", json.dumps(report, indent=1) + "\n")
    return out


def write_plan(model: Path, output: Path, cfg: MxMoEConfig, quantizer: str = "rtn") -> Path:
    """Write ``cfg``'s formats as a checkpoint with round-to-nearest codes, no calibration (uniform
    baselines, the export fallback's source, tests). Reads the expert weights from the safetensors."""
    from safetensors import safe_open

    from .quant import quantize_weight

    if quantizer != "rtn":
        raise ConfigError("write_plan quantizes by round to nearest only (GPTQ needs calibration: `overdrive "
                          "quantize --method mxmoe`)")
    layers = {int(l) for l in cfg.identity["moe_layers"]}
    tensors: dict[tuple[int, int, str], dict[str, torch.Tensor]] = {}
    for shard in checkpoint_shards(Path(model)):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                m = _EXPERT.search(name)
                if m and int(m.group(1)) in layers and m.group(3) in CHECKPOINT_LINEARS:
                    key = (int(m.group(1)), int(m.group(2)), CHECKPOINT_LINEARS[m.group(3)])
                    tensors[key] = quantize_weight(f.get_tensor(name), cfg.format_of(*key), "rtn")[0]
    return write_checkpoint(Path(model), Path(output), cfg, tensors)

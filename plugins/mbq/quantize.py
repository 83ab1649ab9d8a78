"""``overdrive quantize --method mbq``: write an MBQ-format checkpoint.

``--baseline rtn`` rounds the float weights to nearest; ``awq`` / ``mbq`` (default) first search and
fold AWQ-style scales on calibration data (:mod:`.calibrate`, through the LLM calibration layer: one
decoder block on ``device`` at a time), then round; ``gptq`` / ``awq-gptq`` / ``mbq-gptq`` write the
codes GPTQ chose during calibration. Options are checked against the checkpoint's tensor
shapes before any calibration, and the output is written atomically. The CLI is :mod:`.cli`.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from overdrive.checkpoint import check_finite, checkpoint_shards, rewrite_checkpoint
from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import check_device, load_for_calibration

from .calibrate import GPTQ_BASELINES, GPTQ_BUFFERS, SEARCH_TOKENS, GPTQOptions, calibrate
from .config import MBQConfig
from .data import build_calibration, builtin_records, load_records
from .method import METHOD, NAME
from .rotation import rotate
from .quant import rtn_act8_tensors, rtn_group_asymmetric


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
             scope: str = "module", device: str | None = None, dtype: str = "auto",
             offload_activations: bool = False, search_tokens: int = SEARCH_TOKENS,
             gptq_opts: GPTQOptions | None = None) -> Path:
    """Quantize a transformers checkpoint's language-decoder linear layers into ``output``.

    ``cfg.baseline``: "rtn" writes round-to-nearest codes directly; "awq" / "mbq" first calibrate
    (search and fold scales on the float model, see :mod:`.calibrate`), then round to nearest; the GPTQ
    baselines write GPTQ's codes (``gptq_opts``).
    ``device`` (None: CUDA when available, else CPU) runs the calibration one decoder block at a time.
    """
    model, output = Path(model), Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; choose a new --output directory")
    check_group_size(model, cfg)
    if cfg.baseline != "rtn" or cfg.rotation != "none":
        device = check_device(device)
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".mbq-calibrated-", dir=output.parent) as tmp:
            _calibrated_copy(model, Path(tmp), cfg, calib_data, loss_mode, distort, n_samples, seq_len, scope,
                             device=device, dtype=dtype, offload_activations=offload_activations,
                             search_tokens=search_tokens, gptq_opts=gptq_opts)
            return _write(Path(tmp), output, cfg)
    return _write(model, output, cfg)


def _calibrated_copy(model_dir: Path, out: Path, cfg: MBQConfig, calib_data: Path | None, loss_mode: str,
                     distort: bool, n_samples: int = 128, seq_len: int = 512, scope: str = "module", *,
                     device: str | None = None, dtype: str = "auto", offload_activations: bool = False,
                     search_tokens: int = SEARCH_TOKENS, gptq_opts: GPTQOptions | None = None) -> None:
    import torch

    checkpoint_shards(model_dir)  # clear error for a folder that is not a safetensors checkpoint
    # weights stay in the checkpoint's dtype (``dtype``) on the CPU; the block under search runs in float32
    run = load_for_calibration(model_dir, device=device, dtype=dtype, offload_activations=offload_activations,
                               compute_dtype=torch.float32)
    hooks: list = []
    try:
        geo = run.geometry
        if cfg.rotation != "none":
            online, hooks = rotate(run, cfg.rotation)
            if online != cfg.online_hadamard:
                raise ConfigError(f"--rotate {cfg.rotation}: the model's online Hadamard block is {online}, the config "
                                  f"says {cfg.online_hadamard}")
        if cfg.baseline != "rtn":
            records = load_records(calib_data) if calib_data is not None else builtin_records(with_images=geo.is_vlm)
            samples = build_calibration(run.processor, records, list(geo.vision_token_ids), n_samples=n_samples,
                                        seq_len=seq_len)
            calibrate(run, samples, cfg, loss_mode=loss_mode, distort=distort, scope=scope,
                      search_tokens=search_tokens, gptq_opts=gptq_opts)
        run.save(out)
    finally:
        for h in hooks:
            h.remove()
        run.close()


def _check_gptq_codes(model: Path, cfg: MBQConfig) -> None:
    """Every layer ``cfg`` quantizes has GPTQ's tensors in the calibrated copy ``model``."""
    from safetensors import safe_open

    names: set[str] = set()
    for shard in checkpoint_shards(model):
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
    expected = [n.removesuffix(".weight") for n in quantized_shapes(model, cfg)]
    missing = [p for p in expected if f"{p}.gptq_qweight" not in names]
    if missing:
        raise ConfigError(f"{model}: GPTQ calibration left no codes for {missing[0]} ({len(missing)} of "
                          f"{len(expected)} quantized layers)")


def _write(model: Path, output: Path, cfg: MBQConfig) -> Path:
    gptq = cfg.baseline in GPTQ_BASELINES

    def transform(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix, _, leaf = name.rpartition(".")
        if leaf in GPTQ_BUFFERS:  # GPTQ's own tensors of the layer, left by the calibration
            return {f"{prefix}.{GPTQ_BUFFERS[leaf]}": t}
        prefix = name.removesuffix(".weight")
        if not (name.endswith("_proj.weight") and t.dim() == 2 and METHOD.is_quantized_layer(prefix, cfg)):
            return {name: t}
        if gptq:
            return {}  # the dequantized GPTQ weight: its codes are the layer's tensors
        check_finite(name, t)
        if cfg.act_bits == 8:
            return {f"{prefix}.{k}": v for k, v in rtn_act8_tensors(t, cfg.bits).items()}
        if t.shape[1] % cfg.group_size:
            raise ConfigError(f"tensor {name!r} {tuple(t.shape)}: {t.shape[1]} input features are not a multiple "
                              f"of --group-size {cfg.group_size}")
        return {f"{prefix}.{k}": v for k, v in rtn_group_asymmetric(t, cfg.bits, cfg.group_size).items()}

    if gptq:
        _check_gptq_codes(model, cfg)
    return rewrite_checkpoint(model, output, transform, {"quant_method": NAME, **cfg.to_dict()},
                              desc=f"mbq {cfg.scheme} ({cfg.baseline})")

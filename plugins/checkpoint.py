"""Rewriting a safetensors checkpoint into a quantized one, atomically.

``rewrite_checkpoint`` reads every ``*.safetensors`` shard of a transformers checkpoint folder, passes
each tensor through ``transform(name, tensor)`` (which returns the tensors to write in its place),
writes ``model.safetensors`` plus the other files with ``quantization_config`` added to config.json,
all in a temporary sibling folder that is renamed into place only when complete. Only safetensors are
read (never pickles).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .config import ConfigError
from .progress import progress

Transform = Callable[[str, torch.Tensor], Mapping[str, torch.Tensor]]


def checkpoint_shards(model: Path, option: str = "--model") -> list[Path]:
    model = Path(model)
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model / 'config.json'}: not found; {option} must be a transformers checkpoint directory")
    shards = sorted(model.glob("*.safetensors"))
    if not shards:
        raise ConfigError(f"{model}: no *.safetensors files (only safetensors checkpoints are read)")
    return shards


def rewrite_checkpoint(model: Path, output: Path, transform: Transform, quantization_config: Mapping[str, Any],
                       desc: str = "quantize") -> Path:
    """Write ``output`` (must not exist) from ``model`` through ``transform``; returns ``output``."""
    from safetensors.torch import load_file, save_file

    model, output = Path(model), Path(output)
    shards = checkpoint_shards(model)
    with atomic_directory(output) as tmp:
        for f in model.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors = load_file(shard)
            for name, t in progress(tensors.items(), desc=f"{desc} {shard.name}", total=len(tensors), unit="tensor"):
                for new_name, new_t in transform(name, t).items():
                    if new_name in out:
                        raise ConfigError(f"{shard}: tensor {new_name!r} would be written twice")
                    out[new_name] = new_t.contiguous()
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        conf = json.loads((model / "config.json").read_text())
        conf["quantization_config"] = dict(quantization_config)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return output


@contextlib.contextmanager
def atomic_directory(output: Path, option: str = "--output") -> Iterator[Path]:
    """Yield a temporary sibling folder of ``output`` (which must not exist); renamed into place when
    the block completes, removed if it raises, so an interrupted write leaves no half-written folder."""
    output = Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; choose a new {option} directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield tmp
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ConfigError(f"tensor {name!r} {tuple(t.shape)} has {bad} NaN/inf values; refusing to quantize it")

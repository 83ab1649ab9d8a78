"""Rewriting a safetensors checkpoint into a quantized one, atomically.

``rewrite_checkpoint`` reads every ``*.safetensors`` shard of a transformers checkpoint folder, passes
each tensor through ``transform(name, tensor)`` (which returns the tensors to write in its place),
writes ``model.safetensors`` (or size-bounded shards with an index) plus the other files with
``quantization_config`` added to config.json,
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


#: output shard size: a rewrite holds at most about this many bytes of output tensors at a time
MAX_SHARD_BYTES = 2 << 30


def rewrite_checkpoint(model: Path, output: Path, transform: Transform, quantization_config: Mapping[str, Any] | None,
                       desc: str = "quantize", max_shard_bytes: int = MAX_SHARD_BYTES,
                       config_update: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Path:
    """Write ``output`` (must not exist) from ``model`` through ``transform``; returns ``output``.

    Tensors are read one at a time (memory-mapped) and written in output shards of at most
    ``max_shard_bytes`` (a single tensor larger than that gets a shard of its own), so the rewrite of a
    7B model holds one shard's worth of output, not the model: one shard is ``model.safetensors``, more
    are ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json`` as transformers
    writes them. ``transform`` may return nothing for a tensor it buffers (e.g. all experts of a layer,
    emitted merged once the last one arrives). ``quantization_config`` (if not ``None``) is added to
    config.json and ``config_update`` (if given) maps the config dict to the one written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, output = Path(model), Path(output)
    shards = checkpoint_shards(model)
    with atomic_directory(output) as tmp:
        for f in model.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        written: list[tuple[Path, list[str]]] = []
        seen: set[str] = set()
        out: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal out, size
            if out:
                part = tmp / f".part-{len(written):05d}.safetensors"
                save_file(out, str(part), metadata={"format": "pt"})
                written.append((part, list(out)))
            out, size = {}, 0

        for shard in shards:
            with safe_open(str(shard), framework="pt") as src:
                names = list(src.keys())
                for name in progress(names, desc=f"{desc} {shard.name}", total=len(names), unit="tensor"):
                    for new_name, new_t in transform(name, src.get_tensor(name)).items():
                        if new_name in seen:
                            raise ConfigError(f"{shard}: tensor {new_name!r} would be written twice")
                        seen.add(new_name)
                        nbytes = new_t.numel() * new_t.element_size()
                        if out and size + nbytes > max_shard_bytes:
                            flush()
                        out[new_name], size = new_t.contiguous(), size + nbytes
        flush()
        if len(written) == 1:
            written[0][0].rename(tmp / "model.safetensors")
        else:
            n, weight_map = len(written), {}
            for i, (part, names) in enumerate(written, 1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                part.rename(tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        conf = json.loads((model / "config.json").read_text())
        if quantization_config is not None:
            conf["quantization_config"] = dict(quantization_config)
        if config_update is not None:
            conf = config_update(conf)
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

"""PCDVQ's runtime codebook: rebuilt deterministically from the config, cached on disk, checked against
the digest the checkpoint records (the weight-quant contract has no checkpoint-level tensors, so the
codebook stored in a checkpoint's ``pcdvq/codebooks.safetensors`` is for other readers; engines rebuild
it and refuse to start if it differs)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from overdrive.config import ConfigError

from .codebook import codebook_digest, direction_codebook
from .config import PCDVQConfig


def cache_dir() -> Path:
    base = os.environ.get("OVERDRIVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "overdrive")
    return Path(base) / "pcdvq"


def load_codebook(cfg: PCDVQConfig) -> torch.Tensor:
    """The (2**k, 8) float32 direction codebook of ``cfg``; ConfigError if it does not match
    ``cfg.codebook_digest``."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"dir-k{cfg.direction_bits}-n{cfg.codebook_samples}-s{cfg.seed}.safetensors"
    cb = None
    if path.is_file():
        try:
            cb = load_file(str(path))["codebook"]
        except Exception:  # a damaged cache file is rebuilt
            cb = None
        if cb is not None and cfg.codebook_digest and codebook_digest(cb) != cfg.codebook_digest:
            cb = None
    if cb is None:
        cb = direction_codebook(cfg.direction_bits, cfg.codebook_samples, cfg.seed)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file({"codebook": cb}, tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # read-only cache: rebuild next time
    if cfg.codebook_digest and codebook_digest(cb) != cfg.codebook_digest:
        raise ConfigError(
            f"PCDVQ: the direction codebook rebuilt here (digest {codebook_digest(cb)}) differs from the one the "
            f"checkpoint was quantized with (quantization_config.codebook_digest {cfg.codebook_digest}); "
            "re-quantize with this overdrive version")
    return cb

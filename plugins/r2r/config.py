"""The R2R router checkpoint: ``config.json`` (this dataclass) + ``router.safetensors`` in one folder.

    {
      "format": "overdrive.r2r.router", "version": 1,
      "topk": 100, "width": 1024, "num_blocks": 6, "expansion": 4, "dropout": 0.1,
      "threshold": 0.42,
      "small_model": {"architecture": "Qwen2ForCausalLM", "hidden_size": 1536, "vocab_size": 151936,
                      "embedding": "model.embed_tokens.weight", "embedding_shape": [151936, 1536],
                      "embedding_sha256": "..."},
      "training": {...how it was made: data, label counts, epochs, recall at the threshold...}
    }

The router reads the small model's input-embedding table (frozen) for the sampled token; that table
is not copied into the checkpoint but read from the small model's safetensors when the router is
loaded, and checked against ``embedding_sha256`` so a router trained for another small model is
rejected. ``threshold`` is the routing threshold the training picked (route when the router's
probability reaches it); a server or call may override it.
"""
from __future__ import annotations

import dataclasses

from overdrive.config import ConfigError, MethodConfig

FORMAT = "overdrive.r2r.router"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "router.safetensors"
_IDENTITY_KEYS = ("architecture", "hidden_size", "vocab_size", "embedding", "embedding_shape", "embedding_sha256")


@dataclasses.dataclass
class R2RRouterConfig(MethodConfig):
    """Router architecture, threshold and the small model it belongs to (see the module docstring).

    topk        how many of the small model's largest raw logits the router reads (R2R: 100)
    width       width of the residual MLP (R2R: 1024)
    num_blocks  pre-LayerNorm residual blocks, each width -> expansion*width -> width with GELU (R2R: 6)
    expansion   hidden expansion of a block (R2R: 4)
    dropout     dropout inside the blocks while training (R2R: 0.1)
    threshold   route when the router's probability >= threshold (0: always, 1: never)
    small_model identity of the small model (filled by training; empty for a fresh, untrained config)
    training    informational record of how the router was trained
    """

    VERSION = 1
    format: str = FORMAT
    topk: int = 100
    width: int = 1024
    num_blocks: int = 6
    expansion: int = 4
    dropout: float = 0.1
    threshold: float = 0.5
    small_model: dict = dataclasses.field(default_factory=dict)
    training: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.format != FORMAT:
            raise ConfigError(f"R2RRouterConfig.format must be {FORMAT!r}, got {self.format!r} (not an R2R router)")
        for name in ("topk", "width", "expansion"):
            if getattr(self, name) < 1:
                raise ConfigError(f"R2RRouterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 0:
            raise ConfigError(f"R2RRouterConfig.num_blocks must be >= 0, got {self.num_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"R2RRouterConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"R2RRouterConfig.threshold must be in [0, 1], got {self.threshold}")
        if self.small_model:
            missing = [k for k in _IDENTITY_KEYS if k not in self.small_model]
            if missing:
                raise ConfigError(f"R2RRouterConfig.small_model lacks {missing}")
            if self.topk > int(self.small_model["vocab_size"]):
                raise ConfigError(f"R2RRouterConfig.topk {self.topk} exceeds the small model's vocabulary "
                                  f"({self.small_model['vocab_size']})")

    @property
    def hidden_size(self) -> int:
        if not self.small_model:
            raise ConfigError("this router config has no small_model identity (an untrained config)")
        return int(self.small_model["hidden_size"])

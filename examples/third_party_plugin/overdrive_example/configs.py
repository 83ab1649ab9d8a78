from __future__ import annotations

import dataclasses

from overdrive import ConfigError, MethodConfig


@dataclasses.dataclass
class W8Config(MethodConfig):
    """int8 weight-only RTN. ``skip`` lists module-name substrings left unquantized."""

    VERSION = 1
    skip: list = dataclasses.field(default_factory=lambda: ["lm_head"])


@dataclasses.dataclass
class StepCacheConfig(MethodConfig):
    """Recompute on the first ``warmup`` calls, then every ``interval``-th call; reuse in between."""

    VERSION = 1
    interval: int = 2
    warmup: int = 1

    def validate(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"StepCacheConfig.interval must be >= 1, got {self.interval}")
        if self.warmup < 1:
            raise ConfigError(f"StepCacheConfig.warmup must be >= 1, got {self.warmup}")


@dataclasses.dataclass
class Int8KVConfig(MethodConfig):
    """Per-token int8 KV cache: the first ``sink`` tokens stay at full precision. ``model`` (optional) is
    the model identity the plan was made for (``ModelIdentity`` fields); when given, it is checked."""

    VERSION = 1
    sink: int = 4
    model: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.sink < 0:
            raise ConfigError(f"Int8KVConfig.sink must be >= 0, got {self.sink}")
        if self.model:
            from overdrive.contracts.kv_cache import ModelIdentity

            ModelIdentity.from_dict(self.model, source="Int8KVConfig.model")

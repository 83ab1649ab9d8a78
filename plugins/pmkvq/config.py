"""The PM-KVQ plan: per-layer KV bit widths and memory budgets, key scales, and the model identity.

A plan is what ``overdrive calibrate --method pmkvq`` writes and what every runtime (the
transformers cache, the vLLM and SGLang backends) reads. JSON, versioned, validated on load::

    {
      "format": "overdrive.pmkvq.plan", "version": 1,
      "model": {"architecture": "LlamaForCausalLM", "num_layers": 32, "num_attention_heads": 32,
                "num_kv_heads": 8, "head_size": 128},
      "max_len": 32768, "budget": "4GiB", "budget_bytes": 4294967296,
      "candidate_bits": [4, 2], "group_size": 128, "sink": 1, "window": 128, "fp_bytes": 2,
      "layers": [{"bits": 4, "budget_bytes": 142606336, "sensitivity": {"4": 0.012, "2": 0.051},
                  "alpha": 0.5, "key_scale": [[...head_size floats...], ...one row per KV head...]},
                 ...one entry per layer...],
      "calibration": {...how it was made (informational)...}
    }

``bits`` is the layer's final body width (static runtimes use it from the start); ``budget_bytes``
is the layer's memory budget for one sequence of ``max_len`` tokens (the progressive cache halves
the body 16 -> 8 -> 4 -> 2 whenever the layer exceeds it). ``key_scale`` (optional) is the
reparameterisation ``s``: K is stored as K / s and q is multiplied by s; both channels of a rotary
pair (i, i + head_size/2) share a value, so it commutes with RoPE.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from overdrive.config import ConfigError, MethodConfig
from overdrive.contracts.kv_cache import ModelIdentity

FORMAT = "overdrive.pmkvq.plan"
BITS = (16, 8, 4, 2)


@dataclasses.dataclass
class PMKVQPlan(MethodConfig):
    """A PM-KVQ plan (format in the module docstring)."""

    VERSION = 1
    format: str = FORMAT
    model: dict = dataclasses.field(default_factory=dict)
    layers: list = dataclasses.field(default_factory=list)
    max_len: int = 0
    budget: str = ""
    budget_bytes: int = 0
    candidate_bits: list = dataclasses.field(default_factory=lambda: [4, 2])
    group_size: int = 128
    sink: int = 1
    window: int = 128
    fp_bytes: int = 2
    calibration: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.format != FORMAT:
            raise ConfigError(f"PMKVQPlan.format must be {FORMAT!r}, got {self.format!r} (not a PM-KVQ plan)")
        ident = self.identity  # checks the fields
        if len(self.layers) != ident.num_layers:
            raise ConfigError(f"PMKVQPlan: {len(self.layers)} layer entries for a model of {ident.num_layers} layers")
        for b in self.candidate_bits:
            if b not in BITS:
                raise ConfigError(f"PMKVQPlan.candidate_bits: {b} is not one of {BITS}")
        if self.group_size <= 0 or self.group_size % 32:
            raise ConfigError(f"PMKVQPlan.group_size must be a positive multiple of 32, got {self.group_size}")
        if self.sink < 0 or self.window < 0:
            raise ConfigError(f"PMKVQPlan: sink ({self.sink}) and window ({self.window}) must be >= 0")
        if self.fp_bytes not in (2, 4):
            raise ConfigError(f"PMKVQPlan.fp_bytes must be 2 (16-bit) or 4 (32-bit), got {self.fp_bytes}")
        for i, layer in enumerate(self.layers):
            self._check_layer(i, layer, ident)

    @staticmethod
    def _check_layer(i: int, layer: Any, ident: ModelIdentity) -> None:
        where = f"PMKVQPlan.layers[{i}]"
        if not isinstance(layer, dict):
            raise ConfigError(f"{where} must be an object, got {type(layer).__name__}")
        unknown = set(layer) - {"bits", "budget_bytes", "sensitivity", "alpha", "key_scale"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if layer.get("bits") not in BITS:
            raise ConfigError(f"{where}.bits must be one of {BITS}, got {layer.get('bits')!r}")
        bb = layer.get("budget_bytes")
        if not isinstance(bb, int) or isinstance(bb, bool) or bb <= 0:
            raise ConfigError(f"{where}.budget_bytes must be a positive integer, got {bb!r}")
        ks = layer.get("key_scale")
        if ks is None:
            return
        d = ident.head_size
        if (not isinstance(ks, list) or len(ks) != ident.num_kv_heads
                or any(not isinstance(row, list) or len(row) != d for row in ks)):
            raise ConfigError(f"{where}.key_scale must be {ident.num_kv_heads} rows (KV heads) of {d} floats")
        for h, row in enumerate(ks):
            for c, x in enumerate(row):
                if not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
                    raise ConfigError(f"{where}.key_scale[{h}][{c}] must be a positive finite number, got {x!r}")
            half = d // 2
            if any(row[c] != row[c + half] for c in range(half)):
                raise ConfigError(f"{where}.key_scale[{h}]: channels c and c + {half} (a rotary pair) must share "
                                  "one scale, or the scale would not commute with RoPE")

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_dict(self.model, source="PMKVQPlan.model")

    @property
    def layer_bits(self) -> list[int]:
        return [int(x["bits"]) for x in self.layers]

    @property
    def layer_budgets(self) -> list[int]:
        return [int(x["budget_bytes"]) for x in self.layers]

    def check_model(self, model: ModelIdentity, source: str = "PM-KVQ plan") -> None:
        self.identity.check(model, source=source)


def head_group(head_size: int, max_group: int = 128) -> int:
    """Scale/zero group of a head size (the kernels' rule): gcd(head_size, max_group), at least 32."""
    g = math.gcd(head_size, max_group)
    if head_size % 32 or g < 32:
        raise ConfigError(f"PM-KVQ needs a head size that is a multiple of 32, got {head_size}")
    return g


def token_bytes(bits: int, num_kv_heads: int, head_size: int, group: int) -> int:
    """Bytes one token occupies in one layer's compressed body: K and V codes + float32 scale/zero."""
    return 2 * num_kv_heads * (head_size * bits // 8 + 2 * 4 * (head_size // group))


def fp_token_bytes(num_kv_heads: int, head_size: int, fp_bytes: int) -> int:
    """Bytes of one full-precision (sink/window) token in one layer."""
    return 2 * num_kv_heads * head_size * fp_bytes


def layer_peak_bytes(bits: int, length: int, num_kv_heads: int, head_size: int, group: int, sink: int,
                     window: int, fp_bytes: int) -> int:
    """Most memory one layer's cache needs for one sequence of up to ``length`` tokens at ``bits``.

    The window holds up to ``window - 1`` full-precision tokens between flushes, so the peak is at
    ``length`` tokens with a full window: sink + (window - 1) tokens at full precision, the rest compressed.
    """
    fp = fp_token_bytes(num_kv_heads, head_size, fp_bytes)
    tb = token_bytes(bits, num_kv_heads, head_size, group)
    n_sink = min(sink, length)
    n_win = min(max(window - 1, 0), max(length - n_sink, 0))
    return n_sink * fp + n_win * fp + (length - n_sink - n_win) * tb


def make_plan(model: ModelIdentity, layer_bits: list[int], max_len: int, *, group_size: int = 128, sink: int = 1,
              window: int = 128, fp_bytes: int = 2, candidate_bits: list[int] | None = None,
              layer_budgets: list[int] | None = None, key_scales: list | None = None, budget: str = "",
              sensitivity: list[dict] | None = None, alphas: list | None = None,
              calibration: dict | None = None) -> PMKVQPlan:
    """A plan from per-layer final widths; budgets default to each layer's peak at ``max_len`` tokens."""
    group = head_group(model.head_size, group_size)
    if layer_budgets is None:
        layer_budgets = [layer_peak_bytes(b, max_len, model.num_kv_heads, model.head_size, group, sink, window,
                                          fp_bytes) for b in layer_bits]
    layers = []
    for i, b in enumerate(layer_bits):
        entry: dict[str, Any] = {"bits": int(b), "budget_bytes": int(layer_budgets[i])}
        if sensitivity is not None:
            entry["sensitivity"] = {str(k): float(v) for k, v in sensitivity[i].items()}
        if alphas is not None:
            entry["alpha"] = alphas[i]
        if key_scales is not None and key_scales[i] is not None:
            entry["key_scale"] = key_scales[i]
        layers.append(entry)
    return PMKVQPlan(model=model.to_dict(), layers=layers, max_len=int(max_len), budget=budget,
                     budget_bytes=int(sum(layer_budgets)), candidate_bits=list(candidate_bits or sorted(set(layer_bits), reverse=True)),
                     group_size=group_size, sink=sink, window=window, fp_bytes=fp_bytes, calibration=calibration or {})


# ------------------------------------------------------------------------------ calibration options
@dataclasses.dataclass
class CalibOptions:
    max_len: int
    budget: str
    candidate_bits: tuple[int, ...] = (4, 2)
    group_size: int = 128
    sink: int = 1
    window: int = 128
    seq_len: int = 256
    reparam: bool = True
    search_bits: int = 4
    data: str = "builtin"

    def __post_init__(self) -> None:
        if self.max_len <= 0 or self.seq_len <= 0:
            raise ConfigError(f"--max-len ({self.max_len}) and --seq-len ({self.seq_len}) must be positive")
        bad = [b for b in self.candidate_bits if b not in BITS]
        if bad or not self.candidate_bits:
            raise ConfigError(f"--bits {list(self.candidate_bits)}: each must be one of {BITS}")
        if self.search_bits not in BITS:
            raise ConfigError(f"search bits {self.search_bits} must be one of {BITS}")

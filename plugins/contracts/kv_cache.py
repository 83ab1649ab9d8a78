"""The KV-cache / attention-backend contract (kind ``kv_cache_attention``).

An engine keeps the KV cache in fixed-size pages (vLLM, SGLang) or in per-layer tensors
(transformers). A method of this kind decides, per attention layer, how a token's K/V is stored
(:class:`LayerKVFormat`: bytes per (token, KV head) cell, which positions stay at full precision,
which positions a head reads at all) and computes attention over that storage. The engine adapter
sizes its pages from ``LayerKVFormat.cell_bytes``, passes a :class:`PagedBatch` describing the step,
and calls :meth:`KVCacheMethod.store` / :meth:`KVCacheMethod.attend`. Everything is plain torch.

Shared vocabulary (PM-KVQ uses the sink and the recent window for full-precision tokens; a
per-head sparse-span method such as MoA would use the same two ideas to decide which tokens a head
reads, through ``head_spans``):

* **sink**: the first ``sink`` positions of a sequence;
* **recent window**: positions ``>= window_start(length)``, flushed in whole chunks of ``window``
  tokens (see :meth:`LayerKVFormat.window_start`);
* **full-precision store**: where sink and window tokens live when pages hold compressed cells.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence

import torch

from ..config import ConfigError, MethodConfig


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What a KV plan must agree with: architecture and attention geometry of the model."""

    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_size: int

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelIdentity":
        """From a transformers config (or anything with the same attribute names)."""
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        return cls(str(arch), int(cfg.num_hidden_layers), heads, kv, int(head))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> "ModelIdentity":
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError(f"{source}: model identity lacks {missing} (expected {names})")
        try:
            return cls(str(data["architecture"]), *(int(data[n]) for n in names[1:]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: model identity {dict(data)} is not valid ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, model: "ModelIdentity", source: str = "plan") -> None:
        """Raise :class:`ConfigError` naming every geometry field that differs from ``model``.

        The architecture name may differ (the same geometry under another class name, e.g. a
        ``ForCausalLM`` vs a bare model) and is only reported together with a geometry mismatch.
        """
        diffs = [f"{f.name}: plan {getattr(self, f.name)} vs model {getattr(model, f.name)}"
                 for f in dataclasses.fields(self)
                 if f.name != "architecture" and getattr(self, f.name) != getattr(model, f.name)]
        if diffs:
            raise ConfigError(f"{source} was made for another model ({self.architecture}, the model is "
                              f"{model.architecture}): " + "; ".join(diffs))


@dataclasses.dataclass(frozen=True)
class LayerKVFormat:
    """How one attention layer stores and reads its KV cache.

    layer        layer index in the model
    num_kv_heads KV heads of the layer (per tensor-parallel rank, as the engine sees them)
    head_size    channels per head
    bits         code width of compressed cells (16/8/4/2; 0: the engine's dense format)
    group        channels per scale/zero group
    sink         leading positions kept at full precision
    window       recent-window size and flush chunk (0: no window)
    cell_bytes   bytes of one (token, KV head) page cell, K and V together
    q_scale      optional (num_kv_heads, head_size) float tensor: q is multiplied and k divided by it
                 (per channel) before attention and caching (a reparameterisation that leaves q.k
                 unchanged); None: identity
    head_spans   optional per-KV-head number of positions a head reads (sparse-span methods); None: all
    """

    layer: int
    num_kv_heads: int
    head_size: int
    bits: int
    group: int
    sink: int
    window: int
    cell_bytes: int
    q_scale: torch.Tensor | None = None
    head_spans: tuple[int, ...] | None = None

    def window_start(self, length: int) -> int:
        """First position of the full-precision recent window once ``length`` tokens are cached.

        Positions ``[sink, window_start)`` have been flushed (compressed) in whole chunks of
        ``window`` tokens; ``[window_start, length)`` are still at full precision.
        """
        if self.window <= 0:
            return max(length, self.sink)
        body = max(length - self.sink, 0)
        return self.sink + self.window * (body // self.window)


@dataclasses.dataclass
class PagedBatch:
    """One engine step over a paged cache, framework-neutral (tensors on the cache's device).

    Rows are requests; row r has ``prev_lens[r]`` tokens already cached and new tokens
    ``query_start_loc[r]:query_start_loc[r+1]`` in this step's q/k/v. ``block_table[r, i]`` is the page
    of positions ``[i*block_size, (i+1)*block_size)``. Full-precision store addressing (optional):
    ``fp_block_table[r, i]`` is the store slot of that block (-1: none); positions ``>= fp_from[r]`` and,
    when ``sink_ok[r]``, positions ``< sink`` are read from the store.
    """

    query_start_loc: torch.Tensor
    prev_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    fp_block_table: torch.Tensor | None = None
    fp_from: torch.Tensor | None = None
    sink_ok: torch.Tensor | None = None
    fp_write_index: torch.Tensor | None = None  # new tokens (indices into the step) also written to the store
    fp_write_slot: torch.Tensor | None = None   # their store slot * block_size + offset
    host_query_start_loc: list[int] | None = None  # host copies when the engine has them (saves device syncs)
    host_prev_lens: list[int] | None = None


class KVCacheMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach the KV-cache adapters."""

    @abc.abstractmethod
    def load_config(self, source: str | Mapping[str, Any]) -> MethodConfig:
        """The method's plan/config from a path or a mapping; ConfigError naming what is wrong."""

    @abc.abstractmethod
    def layer_formats(self, cfg: MethodConfig, model: ModelIdentity, *, tp_rank: int = 0,
                      tp_size: int = 1) -> list[LayerKVFormat]:
        """Per-layer formats for ``model``; ConfigError (at startup) when ``cfg`` does not fit it."""

    @abc.abstractmethod
    def store(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, k: torch.Tensor,
              v: torch.Tensor, fp_pool: torch.Tensor | None = None) -> None:
        """Write this step's K/V (N, H, D) into page cells (and the full-precision store)."""

    @abc.abstractmethod
    def attend(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, q: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, scale: float, fp_pool: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of this step's queries over the cached prefix and the step's own tokens."""

    def transformers_cache(self, model: torch.nn.Module, cfg: MethodConfig, **options: Any) -> Any:
        """A transformers ``Cache`` for ``model`` (pass as ``past_key_values``); may prepare ``model`` first
        (e.g. fold a reparameterisation into its weights). Default: not available in transformers."""
        raise NotImplementedError(f"{type(self).__name__} has no transformers cache")

    def supported_head_sizes(self) -> Sequence[int] | None:
        """Head sizes the kernels take (None: any the method's checks accept)."""
        return None

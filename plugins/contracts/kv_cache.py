"""The KV-cache / attention-backend contract (kind ``kv_cache_attention``).

An engine keeps the KV cache in fixed-size pages (vLLM), in a token pool it sizes itself (SGLang) or in
per-layer tensors (transformers). A method of this kind decides, per attention layer, how a token's K/V
is stored (:class:`LayerKVFormat`) and computes attention over that storage. Adapters are generic: they
read the formats and call the hooks below, and never know which method they serve.

What each adapter calls (docs/plugins.md has the long form):

* every adapter: :meth:`KVCacheMethod.load_config` (plan path or mapping), then per model
  :meth:`~KVCacheMethod.layer_formats` (paged engines, per tensor-parallel rank) or
  :meth:`~KVCacheMethod.cache_formats` (transformers, with the user's options);
* vLLM (paged, the method sizes the pages): :meth:`~KVCacheMethod.paged_geometry` (head sizes and
  block-size multiple, checked at startup), ``LayerKVFormat.cell_bytes`` (the page cell; 0 keeps the
  engine's dense cell), ``LayerKVFormat.uses_fp_store`` (the adapter keeps a full-precision store of
  the sink and recent window beside the pages and writes it); per step
  :meth:`~KVCacheMethod.transform_qk`, :meth:`~KVCacheMethod.attend` (before this step's tokens are
  stored) and :meth:`~KVCacheMethod.store`;
* SGLang (the engine sizes its own full-precision pool): :meth:`~KVCacheMethod.transform_qk`, the
  engine's attention, then :meth:`~KVCacheMethod.roundtrip` in place on the tokens that leave the
  full-precision sink/window (:meth:`LayerKVFormat.flush_range`);
* transformers (a ``Cache`` per ``generate``): ``q_scale`` folded into the model's q/k projections
  (:func:`fold_qk_scale`; the cache never sees queries), sink and window kept at full precision, the
  rest held as the method's :meth:`~KVCacheMethod.compress` ed body and read through
  :meth:`~KVCacheMethod.decompress`; while a layer is over ``budget_bytes`` it calls
  :meth:`~KVCacheMethod.shrink` (progressive re-compression) and raises :class:`KVBudgetError` when
  the method cannot shrink further.

Shared vocabulary (PM-KVQ uses the sink and the recent window for full-precision tokens; a
per-head sparse-span method such as MoA uses ``sink`` and ``head_spans`` to decide which tokens a
head reads, with dense storage: ``bits = 0``):

* **sink**: the first ``sink`` positions of a sequence;
* **head spans** (:class:`HeadSpans`): per KV head, the positions a query reads: the sink plus the most
  recent ``S_h(N) - sink`` positions, where ``N`` is the query's own length (its position + 1) and
  ``S_h(N) = min(N, max(min_span, ceil(alpha_h + beta_h * N)))`` (an elastic span; ``beta = 0`` is a
  fixed window). Every adapter applies the same rule, so engines agree token for token: vLLM and SGLang
  through the method's ``attend`` / the generic span attention, transformers through its span cache
  (:func:`overdrive.transformers.kv_cache` switches the model's attention to it);
* **recent window**: positions ``>= window_start(length)``, flushed in whole chunks of ``window``
  tokens (see :meth:`LayerKVFormat.window_start`);
* **full-precision store**: where sink and window tokens live when pages hold compressed cells;
  per layer ``(slots, num_kv_heads, block_size, 2 * head_size)`` in the activation dtype, K then V.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch

from ..config import ConfigError, MethodConfig

#: a compressed body: tensors shaped (batch, kv_heads, tokens, ...), concatenated along dim 2 by the adapter
KVBody = tuple[torch.Tensor, ...]


class KVBudgetError(RuntimeError):
    """A layer's KV cache exceeds its ``budget_bytes`` and the method cannot shrink it further."""


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

    def kv_heads_for_rank(self, tp_rank: int = 0, tp_size: int = 1, source: str = "KV cache") -> tuple[int, int]:
        """(first KV head, KV heads) that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds.

        Heads split evenly when ``tp_size <= num_kv_heads``; otherwise they are replicated and rank r holds
        head ``r * num_kv_heads // tp_size`` (vLLM's and SGLang's rule). ConfigError when neither divides.
        """
        hk = self.num_kv_heads
        if hk % tp_size and tp_size % hk:
            raise ConfigError(f"{source}: {hk} KV heads cannot be split over tensor-parallel size {tp_size}")
        if tp_size <= hk:
            return tp_rank * (hk // tp_size), hk // tp_size
        return tp_rank * hk // tp_size, 1

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
class PagedGeometry:
    """What a method's paged kernels accept; vLLM's adapter checks it at startup and reports it to vLLM.

    head_sizes      head sizes the kernels take (None: any the method's ``layer_formats`` accepts)
    block_multiple  the engine's block size must be a multiple of this (e.g. a kernel's token tile)
    """

    head_sizes: tuple[int, ...] | None = None
    block_multiple: int = 1

    def problems(self, head_size: int, block_size: int | None) -> list[str]:
        """What the engine's head size / block size violates (empty when both fit)."""
        out = []
        if block_size is None or block_size % self.block_multiple:
            out.append(f"--block-size {block_size} is not a multiple of {self.block_multiple}, which its kernels need")
        if self.head_sizes is not None and head_size not in self.head_sizes:
            out.append(f"head size {head_size} is not one its kernels take ({_ranges(self.head_sizes)})")
        return out


def _ranges(values: Sequence[int]) -> str:
    v = sorted(values)
    if len(v) > 3 and all(b - a == v[1] - v[0] for a, b in zip(v, v[1:])):
        return f"{v[0]}..{v[-1]} in steps of {v[1] - v[0]}"
    return ", ".join(map(str, v))


@dataclasses.dataclass(frozen=True)
class HeadSpans:
    """Per-KV-head elastic attention spans (sink + recent window per head), shared by every adapter.

    A query that is the ``N``-th token of its sequence (position ``N - 1``) reads, in KV head ``h``, the
    positions ``p <= N - 1`` with ``p < sink`` or ``p >= start_h(N)``, where

        S_h(N)     = min(N, max(min_span, ceil(alpha[h] + beta[h] * N)))     (the span, in positions)
        start_h(N) = N - S_h(N) + sink                                       (>= sink)

    so it reads ``S_h(N)`` positions once ``N >= sink``. ``N`` is the query's own length, not the request's
    final length: a paged engine does not know the final length (``max_tokens`` never reaches the
    attention backend), and a per-query rule makes a chunked or batched prefill compute exactly what
    token-by-token decoding computes. With ``0 <= beta <= 1`` the span grows by at most one position per
    token, so ``start_h`` never decreases: a position that left a head's window is never read by that head
    again (caches may drop it). ``ceil`` is taken in float64 (:meth:`spans`); every adapter calls it.

    alpha     per KV head, tokens (may be negative)
    beta      per KV head, in [0, 1]
    min_span  smallest span (>= the layer's sink; the paper's 128 with a 64-token sink)
    """

    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    min_span: int

    def __post_init__(self) -> None:
        if len(self.alpha) != len(self.beta) or not self.alpha:
            raise ConfigError(f"head spans: alpha has {len(self.alpha)} entries and beta {len(self.beta)}; "
                              "expected one (alpha, beta) per KV head")
        bad = [h for h, (a, b) in enumerate(zip(self.alpha, self.beta))
               if not (math.isfinite(a) and math.isfinite(b) and 0.0 <= b <= 1.0)]
        if bad:
            h = bad[0]
            raise ConfigError(f"head spans: KV head {h} has alpha {self.alpha[h]!r}, beta {self.beta[h]!r}; alpha "
                              "must be finite and beta in [0, 1] (the span may grow by at most one per token)")
        if self.min_span < 1:
            raise ConfigError(f"head spans: min_span must be >= 1, got {self.min_span}")

    @property
    def num_heads(self) -> int:
        return len(self.alpha)

    def select(self, first: int, count: int) -> "HeadSpans":
        """The spans of KV heads ``first .. first + count - 1`` (one tensor-parallel rank)."""
        return HeadSpans(self.alpha[first:first + count], self.beta[first:first + count], self.min_span)

    def spans(self, lengths: torch.Tensor) -> torch.Tensor:
        """``S_h(N)`` for query lengths ``N`` (any int shape): int64 ``(*lengths.shape, num_heads)``."""
        n = lengths.to(torch.float64)[..., None]
        a = torch.tensor(self.alpha, dtype=torch.float64, device=lengths.device)
        b = torch.tensor(self.beta, dtype=torch.float64, device=lengths.device)
        s = torch.ceil(a + b * n).clamp_min(self.min_span)
        return torch.minimum(s, n).to(torch.int64)

    def starts(self, lengths: torch.Tensor, sink: int) -> torch.Tensor:
        """``start_h(N)``: int64 ``(*lengths.shape, num_heads)``; positions in ``[sink, start)`` are not read."""
        n = lengths.to(torch.int64)[..., None]
        return n - self.spans(lengths) + sink

    def density(self, length: int, sink: int) -> list[float]:
        """Per head, the fraction of the causal attention entries of a ``length``-token sequence that are read."""
        n = torch.arange(1, length + 1)
        read = torch.minimum(self.spans(n), n[:, None]).sum(0).double()
        return (read / (length * (length + 1) / 2)).tolist()


@dataclasses.dataclass(frozen=True)
class LayerKVFormat:
    """How one attention layer stores and reads its KV cache.

    layer        layer index in the model
    num_kv_heads KV heads of the layer (per tensor-parallel rank, as the engine sees them)
    head_size    channels per head
    bits         code width of compressed cells (e.g. 16/8/4/2; 0: dense, nothing is compressed)
    group        channels per scale/zero group (method-defined; informational for adapters)
    sink         leading positions kept at full precision (bits > 0) or always read (sparse spans)
    window       recent-window size and flush chunk (0: no window; every token past the sink is
                 compressed once the attention of its own step has used it)
    cell_bytes   bytes of one (token, KV head) page cell, K and V together, a multiple of 4
                 (0: the engine's dense cell)
    q_scale      optional (num_kv_heads, head_size) float tensor: q is multiplied and k divided by it
                 (per channel) before attention and caching (a reparameterisation that leaves q.k
                 unchanged); None: identity. In transformers it is folded into the q/k projections, so
                 it must commute with the model's rotary embedding (channels c and c + head_size/2 equal)
    head_spans   optional :class:`HeadSpans`: which positions each KV head reads (sink + per-head recent
                 window; sparse-span methods, ``bits = 0``). vLLM: the method's ``attend`` applies them;
                 SGLang and transformers: the adapters' generic span attention. None: every position
    budget_bytes optional per-sequence memory budget of this layer in the transformers cache: while
                 the layer holds more, the cache calls :meth:`KVCacheMethod.shrink`; None: unbounded
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
    head_spans: HeadSpans | None = None
    budget_bytes: int | None = None

    def __post_init__(self) -> None:
        where = f"layer {self.layer} KV format"
        if self.cell_bytes < 0 or self.cell_bytes % 4:
            raise ConfigError(f"{where}: cell_bytes must be a non-negative multiple of 4, got {self.cell_bytes}")
        if self.sink < 0 or self.window < 0 or self.bits < 0:
            raise ConfigError(f"{where}: bits ({self.bits}), sink ({self.sink}) and window ({self.window}) "
                              "must be >= 0")
        if self.q_scale is not None and tuple(self.q_scale.shape) != (self.num_kv_heads, self.head_size):
            raise ConfigError(f"{where}: q_scale has shape {tuple(self.q_scale.shape)}, expected "
                              f"({self.num_kv_heads}, {self.head_size}) (KV heads, head size)")
        if self.head_spans is not None:
            if not isinstance(self.head_spans, HeadSpans):
                raise ConfigError(f"{where}: head_spans must be a HeadSpans, got {type(self.head_spans).__name__}")
            if self.head_spans.num_heads != self.num_kv_heads:
                raise ConfigError(f"{where}: head_spans has {self.head_spans.num_heads} entries for "
                                  f"{self.num_kv_heads} KV heads")
            if not self.dense:
                raise ConfigError(f"{where}: head_spans need dense storage (bits 0), got bits {self.bits}")
            if self.head_spans.min_span < self.sink:
                raise ConfigError(f"{where}: head_spans.min_span {self.head_spans.min_span} is below the sink "
                                  f"({self.sink})")

    @property
    def dense(self) -> bool:
        """Nothing is compressed: every position is kept as the engine's K/V."""
        return self.bits == 0

    def span_starts(self, lengths: torch.Tensor) -> torch.Tensor | None:
        """Per KV head, the first non-sink position a query of length ``lengths`` reads (``HeadSpans.starts``);
        None when the layer reads every position."""
        return None if self.head_spans is None else self.head_spans.starts(lengths, self.sink)

    @property
    def uses_fp_store(self) -> bool:
        """Paged engines keep sink/window tokens in a full-precision store beside compressed pages."""
        return not self.dense and (self.sink > 0 or self.window > 0)

    @property
    def fp_store_channels(self) -> int:
        """Channels of one (token, KV head) entry of the full-precision store: K then V."""
        return 2 * self.head_size

    def window_start(self, length: int) -> int:
        """First position of the full-precision recent window once ``length`` tokens are cached.

        Positions ``[sink, window_start)`` have been flushed (compressed) in whole chunks of
        ``window`` tokens; ``[window_start, length)`` are still at full precision.
        """
        if self.window <= 0:
            return max(length, self.sink)
        body = max(length - self.sink, 0)
        return self.sink + self.window * (body // self.window)

    def flush_range(self, prev_len: int, total: int) -> range:
        """Positions that leave full precision when a sequence grows from ``prev_len`` to ``total`` tokens."""
        if self.dense:
            return range(0)
        start = min(max(self.window_start(prev_len), self.sink), total)
        return range(start, max(min(self.window_start(total), total), start))


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
    """Implement this (and return it as ``MethodSpec.impl``) to reach the KV-cache adapters.

    Abstract: :meth:`load_config`, :meth:`layer_formats`, :meth:`store`, :meth:`attend` (paged engines).
    A method whose formats compress (``bits > 0``) also implements :meth:`compress` and
    :meth:`decompress` (SGLang and transformers); the others have working defaults.
    """

    @abc.abstractmethod
    def load_config(self, source: str | Mapping[str, Any]) -> MethodConfig:
        """The method's plan/config from a path or a mapping; ConfigError naming what is wrong."""

    @abc.abstractmethod
    def layer_formats(self, cfg: MethodConfig, model: ModelIdentity, *, tp_rank: int = 0,
                      tp_size: int = 1) -> list[LayerKVFormat]:
        """Per-layer formats for ``model`` on one tensor-parallel rank (paged engines, SGLang);
        ConfigError (at startup) when ``cfg`` does not fit the model."""

    def cache_formats(self, cfg: MethodConfig, model: ModelIdentity, **options: Any) -> list[LayerKVFormat]:
        """Per-layer formats of a transformers cache built with ``options`` (the keyword arguments the
        user passed to ``overdrive.transformers.kv_cache``); these may start wider than the paged formats
        and carry ``budget_bytes`` (progressive schedules). Default: :meth:`layer_formats`, no options."""
        if options:
            raise ConfigError(f"{type(self).__name__}: unknown cache option(s) {sorted(options)} (it takes none)")
        return self.layer_formats(cfg, model)

    def paged_geometry(self) -> PagedGeometry:
        """Head sizes and block-size multiple the paged kernels take. Default: any."""
        return PagedGeometry()

    # -- per step, paged engines -----------------------------------------------------------------
    def transform_qk(self, fmt: LayerKVFormat, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query/key transform applied before attention and caching, q (N, Hq, D), k (N, Hk, D).

        Default: ``fmt.q_scale`` (q * s, k / s per KV head and channel, repeated over GQA groups), identity
        when None. A method may override it with another transform in the engines, but the transformers
        adapter can only realise ``q_scale`` (folded into the weights) and rejects an override.
        """
        if fmt.q_scale is None:
            return q, k
        s = fmt.q_scale.to(device=q.device)
        rep = q.shape[1] // k.shape[1]
        q = (q.float() * s.repeat_interleave(rep, 0)).to(q.dtype)
        k = (k.float() / s).to(k.dtype)
        return q, k

    @abc.abstractmethod
    def store(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write this step's K/V (N, Hk, D) into the page cells at ``batch.slot_mapping`` (slot < 0: skip).

        ``pages`` is the layer's cache as bytes: uint8 ``(blocks, Hk, block_size, cell_bytes)`` (view it as
        the dtype the cells use; the last dimension is contiguous). The full-precision store is written by
        the adapter (``batch.fp_write_index`` / ``fp_write_slot``)."""

    @abc.abstractmethod
    def attend(self, fmt: LayerKVFormat, pages: torch.Tensor, batch: PagedBatch, q: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, scale: float, fp_pool: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of this step's queries over the cached prefix and the step's own tokens
        (at full precision: the step's K/V are stored after attention). ``fp_pool``: the layer's
        full-precision store (when ``fmt.uses_fp_store``), addressed through the batch's ``fp_*`` fields."""

    # -- in-place compression (SGLang, transformers) ----------------------------------------------
    def compress(self, fmt: LayerKVFormat, k: torch.Tensor, v: torch.Tensor) -> KVBody:
        """Compress K/V (batch, Hk, tokens, D) at ``fmt``'s width: tensors shaped (batch, Hk, tokens, ...).
        Tokens must be independent (compressing a concatenation = concatenating compressions)."""
        raise NotImplementedError(f"{type(self).__name__} does not compress in place (bits > 0 needs compress)")

    def decompress(self, fmt: LayerKVFormat, body: KVBody, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V (batch, Hk, tokens, D) in ``dtype`` back from a body made at ``fmt``."""
        raise NotImplementedError(f"{type(self).__name__} does not compress in place (bits > 0 needs decompress)")

    def roundtrip(self, fmt: LayerKVFormat, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention later reads for tokens stored now: ``decompress(compress(k, v))`` in k's dtype."""
        return self.decompress(fmt, self.compress(fmt, k, v), k.dtype)

    def shrink(self, fmt: LayerKVFormat, body: KVBody) -> tuple[LayerKVFormat, KVBody] | None:
        """Re-compress a body to a smaller format (progressive schedules); None: cannot shrink further.
        Default: None."""
        return None


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Self-attention modules of a decoder by layer index: modules with an int ``layer_idx`` and ``q_proj`` /
    ``k_proj`` linears (the transformers convention of Llama, Qwen2, Mistral, ...), where a ``q_scale`` folds."""
    found = {}
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            found[m.layer_idx] = m
    return found


@torch.no_grad()
def fold_qk_scale(q_proj: torch.nn.Linear, k_proj: torch.nn.Linear, scale: torch.Tensor) -> None:
    """Fold a ``q_scale`` (Hk, D) into projection weights in place: k rows / s, q rows * s (GQA-repeated).

    The folded model then produces q * s and k / s, which is what :meth:`KVCacheMethod.transform_qk` does
    at run time in the engines. Computed in float64, biases included.
    """
    s = scale.to(torch.float64)
    hk, d = s.shape
    if q_proj.weight.shape[0] % (hk * d) or k_proj.weight.shape[0] != hk * d:
        raise ConfigError(f"q_scale ({hk} KV heads x {d}) does not fit projections of {q_proj.weight.shape[0]} "
                          f"(q) and {k_proj.weight.shape[0]} (k) output rows")
    rep = q_proj.weight.shape[0] // (hk * d)
    for lin, f in ((k_proj, 1.0 / s.reshape(-1)), (q_proj, s.repeat_interleave(rep, dim=0).reshape(-1))):
        lin.weight.copy_((lin.weight.double() * f[:, None].to(lin.weight.device)).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.double() * f.to(lin.bias.device)).to(lin.bias.dtype))

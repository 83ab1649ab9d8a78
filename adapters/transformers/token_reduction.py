"""transformers adapter for token-reduction methods: per-layer reduction through module hooks.

    import overdrive.transformers as odt
    att = odt.enable(model, NAME, **options)   # NAME: a token-reduction method; a Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision model
    model.generate(**inputs)                           # prefill reduces video tokens layer by layer
    odt.disable(model)                                 # hooks removed: the model is exactly as before

No class is patched. Hooks, all on this model instance, removed by ``detach()``:

* a forward pre-hook on the top model sees ``input_ids`` (and the video grid) of each call and starts
  a per-request reducer for a prefill that contains video tokens (no video: nothing happens);
* a forward pre-hook on every decoder layer hands the method that layer's input hidden states (per
  sample) and an attention probe, and rewrites the layer's inputs to the tokens that go on: hidden
  states, the rotary ``position_embeddings`` rows (multimodal rotary included: kept tokens keep their
  original positions), ``position_ids`` and the attention-mask rows and columns. Each layer's KV cache
  therefore holds that layer's tokens; during decoding the same hook gives each layer a mask over its
  own cache length. Samples of a batch are reduced independently and left-padded to a common length
  (padding slots are masked out, so they are never attended to).

Per-model knowledge is metadata (:data:`VLMS`): where the decoder layers are, which config field is
the video token, and how a family lays video tokens out in the sequence.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from overdrive.adapters.transformers import attachments
from overdrive.config import MethodConfig
from overdrive.contracts.token_reduction import TokenReductionMethod, VideoGrid, VisionSpan
from overdrive.kinds import Kind

log = logging.getLogger("overdrive")

SpanFn = Callable[[torch.nn.Module, torch.Tensor, Mapping[str, Any]], list[list[VisionSpan]]]


# -- per-family metadata ----------------------------------------------------------------------------
def _runs(ids: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token`` in a 1-D id tensor."""
    hit = (ids == token).to(torch.int8)
    if not bool(hit.any()):
        return []
    edges = torch.diff(torch.nn.functional.pad(hit, (1, 1)))
    starts = (edges == 1).nonzero().squeeze(-1).tolist()
    stops = (edges == -1).nonzero().squeeze(-1).tolist()
    return [(a, b - a) for a, b in zip(starts, stops)]


def qwen2_vl_spans(model: torch.nn.Module, input_ids: torch.Tensor, kw: Mapping[str, Any]) -> list[list[VisionSpan]]:
    """Qwen2-VL family: each run of video tokens is one video. Its grid comes from ``video_grid_thw``
    (rows in order of appearance) or, when ``generate`` passes pre-encoded vision outputs instead,
    from the 3-D multimodal rotary ``position_ids`` (temporal/height/width indices of the run)."""
    cfg = model.config
    token = cfg.video_token_id
    grids = kw.get("video_grid_thw")
    pos = kw.get("position_ids")
    merge = cfg.vision_config.spatial_merge_size
    out: list[list[VisionSpan]] = []
    row = 0
    for b in range(input_ids.shape[0]):
        spans = []
        for start, length in _runs(input_ids[b], token):
            if grids is not None:
                if row >= grids.shape[0]:
                    raise ValueError("token reduction: the prompt has more video-token runs than video_grid_thw rows")
                t, h, w = (int(x) for x in grids[row])
                grid = VideoGrid(t, h // merge, w // merge)
            elif pos is not None and pos.dim() == 3 and pos.shape[0] in (3, 4):
                thw = pos[-3:, b, start:start + length]
                rows = int(thw[1].max() - thw[1].min()) + 1
                cols = int(thw[2].max() - thw[2].min()) + 1
                grid = VideoGrid(max(1, length // (rows * cols)), rows, cols)
            else:
                raise ValueError("token reduction: cannot tell the video grid: pass video_grid_thw or 3-D position_ids")
            if grid.num_tokens != length:
                raise ValueError(f"token reduction: video {row} has {length} placeholder tokens but its grid "
                                 f"{grid.frames}x{grid.rows}x{grid.cols} gives {grid.num_tokens}")
            spans.append(VisionSpan(start, grid))
            row += 1
        out.append(spans)
    return out


def llava_onevision_spans(model: torch.nn.Module, input_ids: torch.Tensor,
                          kw: Mapping[str, Any]) -> list[list[VisionSpan]]:
    """LLaVA-OneVision: each run is frames x (side/2)^2 pooled tokens, then one newline token (text)."""
    cfg = model.config
    side = math.ceil(cfg.vision_config.image_size // cfg.vision_config.patch_size / 2)
    tpf = side * side
    out: list[list[VisionSpan]] = []
    for b in range(input_ids.shape[0]):
        spans = []
        for start, length in _runs(input_ids[b], cfg.video_token_id):
            frames, rest = divmod(length - 1, tpf)
            if rest or frames <= 0:
                raise ValueError(f"token reduction: a run of {length} video tokens is not frames x {tpf} + 1 newline")
            spans.append(VisionSpan(start, VideoGrid(frames, side, side)))
        out.append(spans)
    return out


@dataclasses.dataclass(frozen=True)
class VLMInfo:
    """What the per-layer adapter needs to know about a vision-language model class.

    family          key of per-family defaults in a method's config (``TokenReductionMethod.resolve``)
    decoder         attribute path from the top model to the module holding ``layers``
    spans           layout function: (model, input_ids, forward kwargs) -> per-sample video spans
    """

    family: str
    decoder: str
    spans: SpanFn
    layers: str = "layers"
    input_norm: str = "input_layernorm"
    attention: str = "self_attn"


#: top-model class name -> metadata (names, not classes, so importing this module imports no transformers)
VLMS: dict[str, VLMInfo] = {
    "Qwen2_5_VLForConditionalGeneration": VLMInfo("qwen2_vl", "model.language_model", qwen2_vl_spans),
    "Qwen2VLForConditionalGeneration": VLMInfo("qwen2_vl", "model.language_model", qwen2_vl_spans),
    "LlavaOnevisionForConditionalGeneration": VLMInfo("llava_onevision", "model.language_model",
                                                      llava_onevision_spans),
}


def register_vlm(class_name: str, info: VLMInfo) -> None:
    """Teach the adapter another model class (or override an entry)."""
    VLMS[class_name] = info


def vlm_info(model: torch.nn.Module) -> VLMInfo:
    for cls in type(model).__mro__:
        if cls.__name__ in VLMS:
            return VLMS[cls.__name__]
    raise TypeError(f"{type(model).__name__} is not a supported vision-language model for token reduction; "
                    f"supported: {', '.join(sorted(VLMS))} (add one with register_vlm)")


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# -- per-request state -----------------------------------------------------------------------------
class _Session:
    """One prefill (and the decoding that follows it) of one batch."""

    def __init__(self, reducer: Any, batch: int, length: int, device: torch.device) -> None:
        self.reducer = reducer
        self.batch, self.length = batch, length
        self.orig = [torch.arange(length, device=device) for _ in range(batch)]  # original index per token
        self.slot: torch.Tensor | None = None   # (B, S_l) original index per slot, -1 = padding slot
        self.pad_valid: torch.Tensor | None = None  # (B, S) original padding mask (True = real token)
        self.layer_valid: dict[int, torch.Tensor] = {}  # layer -> (B, S_l) slots that are real tokens
        self.kept: dict[int, list[torch.Tensor]] = {}   # layer -> per-sample original indices it computed on
        self.decoding = False

    @property
    def reduced(self) -> bool:
        return self.slot is not None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class TokenReductionAttachment:
    """Hooks of one token-reduction method on one model; ``detach()`` removes them all."""

    def __init__(self, model: torch.nn.Module, name: str, method: TokenReductionMethod, cfg: MethodConfig,
                 info: VLMInfo) -> None:
        self.model, self.name, self.method, self.cfg, self.info = model, name, method, cfg, info
        decoder = _getattr_path(model, info.decoder)
        self.layers = list(_getattr_path(decoder, info.layers))
        self.num_layers = len(self.layers)
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"{name}: attention implementation {impl!r} is not supported (per-layer token "
                             "reduction rebuilds 4-D attention masks); load the model with "
                             "attn_implementation='sdpa' or 'eager'")
        self.float_mask = impl == "eager"
        self.session: _Session | None = None
        self.summaries: list[list[dict]] = []  # one entry per reduced prefill: per-sample summaries
        self._handles = [model.register_forward_pre_hook(self._top_pre, with_kwargs=True)]
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))

    # -- lifecycle ---------------------------------------------------------------------------
    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.session = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- hooks -------------------------------------------------------------------------------
    def _top_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past > 0:  # decoding: keep the session of the prefill that filled this cache
            if self.session is not None:
                self.session.decoding = True
            return
        self.session = None
        if ids is None or ids.dim() != 2 or ids.shape[1] < 2:
            return
        spans = self.info.spans(module, ids, kwargs)
        if not any(spans):
            return
        if kwargs.get("labels") is not None:
            raise ValueError(f"{self.name}: token reduction changes the sequence length; it is for inference "
                             "(drop labels or disable the method)")
        if cache is not None:
            _check_cache(self.name, cache)
        reducer = self.method.layerwise(self.cfg, self.num_layers, spans, [ids.shape[1]] * ids.shape[0])
        self.session = _Session(reducer, ids.shape[0], ids.shape[1], ids.device)
        mask2d = kwargs.get("attention_mask")
        self.session.pad_valid = (mask2d.bool() if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2
                                  else torch.ones_like(ids, dtype=torch.bool))

    def _layer_pre(self, idx: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
            s = self.session
            if s is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if s.decoding:
                return self._decode_inputs(idx, s, hidden, args, kwargs)
            return self._prefill_inputs(idx, module, s, hidden, args, kwargs)
        return hook

    # -- prefill -----------------------------------------------------------------------------
    def _prefill_inputs(self, idx: int, layer: torch.nn.Module, s: _Session, hidden: torch.Tensor,
                        args: tuple, kwargs: dict):
        if hidden.shape[:2] != ((s.batch, s.length) if not s.reduced else tuple(s.slot.shape)):
            raise RuntimeError(f"{self.name}: layer {idx} got hidden states {tuple(hidden.shape)}; the decoder "
                               "does not run its layers in order on the sequence the reduction produced")
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_embeddings")
        cur = self._current(s, hidden)
        probe = self._probe(layer, s, pos)
        red = s.reducer.step(idx, cur, probe)
        if red is not None:
            s.orig = [o[r.keep] for o, r in zip(s.orig, red)]
            cur = [r.hidden for r in red]
            width = max(o.numel() for o in s.orig)
            slot = torch.full((s.batch, width), -1, dtype=torch.long, device=hidden.device)
            new = hidden.new_zeros((s.batch, width, hidden.shape[-1]))
            for b, (o, h) in enumerate(zip(s.orig, cur)):
                slot[b, width - o.numel():] = o
                new[b, width - o.numel():] = h.to(new.dtype)
            s.slot, hidden = slot, new
        s.kept[idx] = [o.clone() for o in s.orig]
        if idx == self.num_layers - 1:
            self.summaries.append(s.reducer.summary())
            self._log(s)
        if not s.reduced:
            return None
        valid = s.slot >= 0
        safe = s.slot.clamp_min(0)
        valid &= torch.gather(s.pad_valid, 1, safe)
        s.layer_valid[idx] = valid
        kwargs = dict(kwargs)
        if pos is not None:
            kwargs["position_embeddings"] = tuple(_gather_seq(p, safe) for p in pos)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _gather_positions(kwargs["position_ids"], safe)
        kwargs["attention_mask"] = self._prefill_mask(mask, s, safe, valid, hidden)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _current(self, s: _Session, hidden: torch.Tensor) -> list[torch.Tensor]:
        if not s.reduced:
            return [hidden[b] for b in range(s.batch)]
        return [hidden[b, s.slot.shape[1] - o.numel():] for b, o in enumerate(s.orig)]

    def _probe(self, layer: torch.nn.Module, s: _Session, pos: Any) -> Callable:
        norm = _getattr_path(layer, self.info.input_norm)
        attn = _getattr_path(layer, self.info.attention)

        def probe(samples: Sequence[int], hiddens: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor]):
            out = []
            for b, h, keep in zip(samples, hiddens, keeps):
                orig = s.orig[b][keep]
                x = norm(h[None])[0]
                q = attn.q_proj(x[-1:]).view(1, -1, attn.head_dim).transpose(0, 1)   # (Hq, 1, d)
                k = attn.k_proj(x).view(x.shape[0], -1, attn.head_dim).transpose(0, 1)  # (Hk, m, d)
                if pos is not None:
                    cos, sin = (p[b].index_select(0, orig) for p in pos)  # (m, d)
                    k = k * cos + _rotate_half(k) * sin
                    q = q * cos[-1:] + _rotate_half(q) * sin[-1:]
                k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
                scores = (q.float() @ k.float().transpose(-1, -2))[:, 0] * attn.scaling  # (Hq, m)
                valid = s.pad_valid[b].index_select(0, orig)
                scores = scores.masked_fill(~valid[None], float("-inf"))
                out.append(torch.softmax(scores, dim=-1).mean(0))
            return out
        return probe

    def _prefill_mask(self, mask: torch.Tensor | None, s: _Session, safe: torch.Tensor, valid: torch.Tensor,
                      hidden: torch.Tensor) -> torch.Tensor:
        B, W = safe.shape
        if mask is None:
            allowed = safe[:, None, :] <= safe[:, :, None]  # causal in original order
        else:
            m = mask if mask.dtype == torch.bool else (mask == 0)
            m = m[:, 0] if m.dim() == 4 else m
            m = m.expand(B, -1, -1) if m.shape[0] != B else m
            rows = torch.gather(m, 1, safe[:, :, None].expand(B, W, m.shape[-1]))
            allowed = torch.gather(rows, 2, safe[:, None, :].expand(B, W, W))
        allowed = allowed & valid[:, None, :]
        allowed |= torch.eye(W, dtype=torch.bool, device=safe.device)[None] & ~valid[:, :, None]  # pad rows: self
        return self._format_mask(allowed[:, None], hidden.dtype)

    # -- decoding ----------------------------------------------------------------------------
    def _decode_inputs(self, idx: int, s: _Session, hidden: torch.Tensor, args: tuple, kwargs: dict):
        if not s.reduced:
            return None
        valid = s.layer_valid[idx]
        cache = kwargs.get("past_key_values")
        cached = cache.get_seq_length(idx) if cache is not None else valid.shape[1]
        q = hidden.shape[1]
        new = cached - valid.shape[1]  # tokens decoded since the prefill, already cached
        if new < 0:
            raise RuntimeError(f"{self.name}: layer {idx} cache holds {cached} tokens, fewer than its "
                               f"{valid.shape[1]} prefill tokens")
        B = hidden.shape[0]
        head = valid[:, None, :].expand(B, q, -1)
        tail = torch.ones(q, new + q, dtype=torch.bool, device=hidden.device).tril(diagonal=new)
        allowed = torch.cat([head, tail[None].expand(B, -1, -1)], dim=-1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self._format_mask(allowed[:, None], hidden.dtype)
        return args, kwargs

    def _format_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.float_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def _log(self, s: _Session) -> None:
        for b, x in enumerate(self.summaries[-1]):
            if x["vision_tokens"]:
                log.info("overdrive %s: sample %d: %d video tokens, kept per layer %s (merged %d, pruned %d, "
                         "cost %.3f)", self.name, b, x["vision_tokens"], x["per_layer"], x["merged"], x["pruned"],
                         x["cost"] if x["cost"] is not None else float("nan"))


def _gather_seq(t: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Rows of a (B or 1, S, ...) per-token tensor (e.g. rotary cos/sin) at slot indices ``safe`` (B, W)."""
    if t.shape[0] != safe.shape[0]:
        t = t.expand(safe.shape[0], *t.shape[1:])
    idx = safe.view(*safe.shape, *([1] * (t.dim() - 2))).expand(*safe.shape, *t.shape[2:])
    return torch.gather(t, 1, idx)


def _gather_positions(p: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    if p.dim() == 3:  # (k, B, S)
        return torch.stack([_gather_positions(x, safe) for x in p])
    if p.shape[0] != safe.shape[0]:
        p = p.expand(safe.shape[0], -1)
    return torch.gather(p, 1, safe)


def _check_cache(name: str, cache: Any) -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", [])
    if not isinstance(cache, DynamicCache) or any(
            not isinstance(x, DynamicLayer) or isinstance(x, DynamicSlidingWindowLayer) for x in layers):
        raise TypeError(f"{name}: per-layer token reduction needs a DynamicCache with full-attention layers "
                        f"(each layer keeps its own KV length), got {type(cache).__name__}")


# -- public API ------------------------------------------------------------------------------------
def enable(model: torch.nn.Module, method: str, config: MethodConfig | Mapping[str, Any] | None = None,
           **options: Any) -> TokenReductionAttachment:
    """Attach token-reduction ``method`` to a transformers vision-language model; returns the attachment."""
    import overdrive

    spec = overdrive.get_method(method, Kind.TOKEN_REDUCTION)
    info = vlm_info(model)
    attachments.claim(model, Kind.TOKEN_REDUCTION)
    impl = spec.load_impl()
    if not isinstance(impl, TokenReductionMethod):
        raise TypeError(f"method {spec.name!r}: impl must be a TokenReductionMethod, got {type(impl).__name__}")
    cfg = impl.resolve(spec.make_config(config, **options), info.family)
    att = TokenReductionAttachment(model, spec.name, impl, cfg, info)
    return attachments.put(model, Kind.TOKEN_REDUCTION, att)

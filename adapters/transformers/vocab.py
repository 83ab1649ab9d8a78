"""transformers adapter for vocabulary-selection methods (kind ``vocabulary_selection``).

    import overdrive.transformers as odt
    att = odt.enable(model, "vocabtailor", profile="profile.json")   # a causal LM (tokenizer= optional)
    model.generate(**inputs, logits_processor=[...])                  # the user's processors still run
    odt.disable(model)                                                # the model is exactly as before

What changes on the model instance (no class is patched; ``detach()`` undoes all of it):

* the input embedding module is replaced by :class:`OffloadedEmbedding`: the original module (and its
  weight) moves to the CPU; each step looks up the step's rows there and moves only them to the model's
  device. The original module is held outside the module tree, so ``model.parameters()`` and
  ``model.device`` describe what stays on the device;
* the output embedding (LM head) is replaced by :class:`TailoredHead`: the full weight (and bias) stays on
  the CPU (shared with the embedding when tied); the rows every request may use (the method's special
  and static ids) are kept on the device, and at each prefill the batch's extra rows (prompt tokens) are
  gathered from the CPU once. The head computes logits over the batch's union of allowed rows only and
  scatters them into a full-vocabulary tensor with ``-inf`` outside each request's own set, so
  ``generate()``, logits processors and sampling see standard shapes;
* a forward pre-hook on the model reads each prefill's ``input_ids`` (and ``attention_mask``) and asks
  the method for every request's allowed set; decoding steps reuse it. ``att.requests(prompts)`` sets
  them explicitly (teacher-forced evaluation, embeddings input). Models that soft-cap their final
  logits get the mask re-applied after the cap.

``calibrate_command`` is ``overdrive calibrate --method NAME``: it tokenizes the corpus with the model's
tokenizer (no weights are loaded) and hands token ids to the method's profiler.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from overdrive.adapters.transformers import attachments
from overdrive.config import ConfigError, MethodConfig
from overdrive.contracts.vocab import BatchVocab, VocabIdentity, VocabSelectionMethod, tokenizer_hash
from overdrive.kinds import Kind

log = logging.getLogger("overdrive")


# -- model identity and special tokens ---------------------------------------------------------------
def model_identity(config: Any, tokenizer: Any) -> VocabIdentity:
    """The :class:`VocabIdentity` of a transformers config + tokenizer."""
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return VocabIdentity(str(archs[0]), int(text.vocab_size), tokenizer_hash(tokenizer.get_vocab()))


def special_token_ids(tokenizer: Any, *configs: Any) -> list[int]:
    """The tokenizer's special tokens plus the bos/eos/pad ids the model or generation config declare."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    for c in configs:
        if c is None:
            continue
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(c, name, None)
            for i in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(i, int) and i >= 0:
                    ids.add(i)
    return sorted(ids)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load a tokenizer from this folder ({e})") from None


def _generation_config(path: str | Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return None


# -- overdrive calibrate --method NAME ---------------------------------------------------------------
def calibrate_command(args: Any) -> int:
    """Profile a task corpus for a vocabulary-selection method; writes the profile JSON atomically."""
    import overdrive
    from transformers import AutoConfig

    spec = overdrive.get_method(args.method, Kind.VOCAB)
    method = spec.load_impl()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model {model}: no config.json (expected a transformers model folder)")
    config = AutoConfig.from_pretrained(str(model))
    tok = load_tokenizer(model)
    ident = model_identity(config, tok)
    special = special_token_ids(tok, config, _generation_config(model))
    options = method.profile_options(args)
    docs = method.documents(args)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    profile = method.build_profile(ids, ident, special, lambda xs: [tok.decode([int(i)]) for i in xs], options)
    out = profile.save(args.output)
    stats = getattr(profile, "stats", {})
    print(f"{spec.name}: wrote {out} for {ident.architecture} (vocabulary {ident.vocab_size}): "
          + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


# -- the modules that replace the embedding and the LM head ------------------------------------------
class OffloadedEmbedding(torch.nn.Module):
    """The model's input embedding, kept on the CPU: rows are looked up there and moved to ``device``."""

    def __init__(self, inner: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a submodule: its weight is not a device parameter
        self.target_device = device

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def num_embeddings(self) -> int:
        return self.inner.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.inner.weight.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.inner(input_ids.to(self.inner.weight.device))
        return rows.to(self.target_device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on {self.inner.weight.device}, rows to {self.target_device}"


class TailoredHead(torch.nn.Module):
    """The LM head over the batch's allowed rows; full-vocabulary logits with ``-inf`` elsewhere."""

    def __init__(self, att: "VocabAttachment") -> None:
        super().__init__()
        object.__setattr__(self, "_att", att)
        self.register_buffer("base_ids", att.base_ids.to(att.device), persistent=False)
        self.register_buffer("base_weight", att.full_weight.index_select(0, att.base_ids).to(att.device),
                             persistent=False)
        bias = att.full_bias
        self.register_buffer("base_bias", None if bias is None else bias.index_select(0, att.base_ids).to(att.device),
                             persistent=False)
        self.batch: BatchVocab | None = None
        self.weight_u: torch.Tensor | None = None  # (U, D) rows of the current batch's union, on the device
        self.bias_u: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self._att.full_weight

    def set_batch(self, batch: BatchVocab) -> None:
        att = self._att
        union = batch.union
        pos = torch.searchsorted(self.base_ids, union).clamp_max(self.base_ids.numel() - 1)
        in_base = self.base_ids[pos] == union
        w = self.base_weight.new_empty((union.numel(), self.base_weight.shape[1]))
        w[in_base] = self.base_weight[pos[in_base]]
        extra = union[~in_base].cpu()
        if extra.numel():
            w[~in_base] = att.full_weight.index_select(0, extra).to(w.device, non_blocking=True)
        b = None
        if self.base_bias is not None:
            b = self.base_bias.new_empty(union.numel())
            b[in_base] = self.base_bias[pos[in_base]]
            if extra.numel():
                b[~in_base] = att.full_bias.index_select(0, extra).to(b.device)
        self.batch, self.weight_u, self.bias_u = batch, w, b

    def clear(self) -> None:
        self.batch = self.weight_u = self.bias_u = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            raise RuntimeError(f"{self._att.name}: the LM head has no allowed sets for this call: the model was "
                               "called without input_ids on a prefill; wrap the call in att.requests(prompts)")
        if hidden.shape[0] != self.batch.batch:
            raise RuntimeError(f"{self._att.name}: a batch of {hidden.shape[0]} rows, but the allowed sets were made "
                               f"for {self.batch.batch} requests (at the last prefill)")
        compact = torch.nn.functional.linear(hidden, self.weight_u.to(hidden.dtype),
                                             None if self.bias_u is None else self.bias_u.to(hidden.dtype))
        return self.batch.scatter(compact)

    def extra_repr(self) -> str:
        u = "-" if self.batch is None else self.batch.union.numel()
        return f"vocab={self._att.vocab}, resident rows={self.base_ids.numel()}, batch rows={u}"


# -- one method on one model -------------------------------------------------------------------------
class VocabAttachment:
    """A vocabulary-selection method on one causal LM; ``detach()`` restores the model exactly."""

    def __init__(self, model: torch.nn.Module, name: str, method: VocabSelectionMethod, cfg: MethodConfig,
                 profile: Any, identity: VocabIdentity) -> None:
        self.model, self.name, self.method, self.cfg, self.profile = model, name, method, cfg, profile
        self.identity = identity
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if emb is None or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise TypeError(f"{name}: {type(model).__name__} has no input and output embeddings to replace "
                            "(expected a causal LM with get_input_embeddings/get_output_embeddings)")
        if isinstance(emb, OffloadedEmbedding) or isinstance(head, TailoredHead):
            raise RuntimeError(f"{name}: the model's embeddings are already replaced by a vocabulary method")
        self.vocab = head.weight.shape[0]
        if self.vocab < identity.vocab_size:
            raise ConfigError(f"{name}: the LM head has {self.vocab} rows, fewer than the vocabulary size "
                              f"{identity.vocab_size}")
        self.device = head.weight.device
        self.tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
        self._emb, self._head = emb, head
        self._emb_device, self._head_device = emb.weight.device, head.weight.device
        emb.to("cpu")
        if not self.tied:
            head.to("cpu")
        self.full_weight = head.weight.detach()
        self.full_bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
        self.base_ids = method.allowed(profile, cfg, [None])[0]
        self.embedding = OffloadedEmbedding(emb, self.device)
        self.head = TailoredHead(self)
        model.set_input_embeddings(self.embedding)
        model.set_output_embeddings(self.head)
        self._fixed = False
        self._mask: torch.Tensor | None = None
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if self.softcap:
            self._handles.append(model.register_forward_hook(self._post))
        log.info("%s: embedding (%d x %d) on the CPU, LM head over %d resident rows + each batch's prompt rows",
                 name, emb.weight.shape[0], emb.weight.shape[1], self.base_ids.numel())

    # -- per-request vocabularies -------------------------------------------------------------
    def set_requests(self, prompts: Sequence[torch.Tensor | Sequence[int] | None]) -> BatchVocab:
        """Make the allowed sets for a batch (one prompt per request) and load their LM-head rows."""
        allowed = self.method.allowed(self.profile, self.cfg, [None if p is None else torch.as_tensor(p)
                                                               for p in prompts])
        batch = BatchVocab.from_allowed(allowed, self.vocab, device=self.device)
        self.head.set_batch(batch)
        self._mask = None
        return batch

    @contextlib.contextmanager
    def requests(self, prompts: Sequence[torch.Tensor | Sequence[int] | None]) -> Iterator[BatchVocab]:
        """Use these requests' allowed sets for every call inside (e.g. teacher-forced evaluation)."""
        batch = self.set_requests(prompts)
        self._fixed = True
        try:
            yield batch
        finally:
            self._fixed = False

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._fixed:
            return
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past > 0 and self.head.batch is not None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise RuntimeError(f"{self.name}: called with inputs_embeds and no input_ids: the prompt tokens are "
                                   "unknown; wrap the call in att.requests(prompts)")
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == ids.shape:
            prompts = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
        else:
            prompts = [ids[b] for b in range(ids.shape[0])]
        self.set_requests(prompts)

    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if logits is None or self.head.batch is None:
            return output
        if self._mask is None:
            self._mask = self.head.batch.full_mask()
        logits.masked_fill_(~self._mask[:, None, : logits.shape[-1]].to(logits.device), float("-inf"))
        return output

    # -- accounting ---------------------------------------------------------------------------
    def device_bytes(self) -> dict[str, int]:
        """Bytes of the vocabulary components on the model's device now, and what the full ones take."""
        w = self.full_weight
        row = w.shape[1] * w.element_size()
        resident = self.base_ids.numel() * row
        batch = 0 if self.head.weight_u is None else self.head.weight_u.numel() * self.head.weight_u.element_size()
        full = w.shape[0] * row * (1 if self.tied else 2)
        if self.full_bias is not None:
            full += self.full_bias.numel() * self.full_bias.element_size()
        return {"resident_rows": resident, "batch_rows": batch, "total": resident + batch, "full": full}

    # -- lifecycle ----------------------------------------------------------------------------
    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.head.clear()
        self.model.set_input_embeddings(self._emb)
        self.model.set_output_embeddings(self._head)
        self._emb.to(self._emb_device)
        if not self.tied:
            self._head.to(self._head_device)

    @property
    def attached(self) -> bool:
        return bool(self._handles)


# -- public API ------------------------------------------------------------------------------------
def enable(model: torch.nn.Module, method: str, config: MethodConfig | Mapping[str, Any] | None = None,
           tokenizer: Any = None, **options: Any) -> VocabAttachment:
    """Attach vocabulary-selection ``method`` to a transformers causal LM; returns the attachment.

    ``tokenizer`` identifies the model (its vocabulary hash is checked against the profile); by default
    it is loaded from ``model.name_or_path``.
    """
    import overdrive

    spec = overdrive.get_method(method, Kind.VOCAB)
    attachments.claim(model, Kind.VOCAB)
    impl = spec.load_impl()
    if not isinstance(impl, VocabSelectionMethod):
        raise TypeError(f"method {spec.name!r}: impl must be a VocabSelectionMethod, got {type(impl).__name__}")
    cfg = spec.make_config(config, **options)
    profile = impl.load_profile(cfg)
    if tokenizer is None:
        where = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        if not where or not Path(where).is_dir():
            raise ValueError(f"{spec.name}: pass tokenizer= (the model was not loaded from a folder holding one)")
        tokenizer = load_tokenizer(where)
    ident = model_identity(model.config, tokenizer)
    impl.check_model(profile, ident, source=f"{spec.name} profile {getattr(cfg, 'profile', '')}".strip())
    att = VocabAttachment(model, spec.name, impl, cfg, profile, ident)
    return attachments.put(model, Kind.VOCAB, att)

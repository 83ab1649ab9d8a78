"""The vocabulary-selection contract (kind ``vocabulary_selection``): a per-request vocabulary for the LM head.

A method decides, for each request of a batch, which token ids the model may produce (its *allowed
set*); the adapters keep the embedding table off the accelerator and compute the LM head only over the
rows the batch needs. Everything here is plain torch and framework-neutral:

* :class:`VocabIdentity` — the model a vocabulary profile was made for (architecture, vocabulary size,
  a hash of the tokenizer's id -> token mapping); adapters build it from the loaded model and refuse a
  profile made for another one;
* :class:`BatchVocab` — one batch's allowed sets as the union of their rows (the LM-head rows to compute)
  and, per request, which of those rows it may use; :meth:`BatchVocab.scatter` turns the compact logits
  over the union into full-vocabulary logits with ``-inf`` outside each request's own set, so logits
  processors and samplers see the standard shape;
* :class:`VocabSelectionMethod` — what a method implements (profile loading and checking, the allowed
  sets of a batch, offline profiling from token ids).

Tokenization, model loading and module placement are the adapters' business: the method sees token
ids and token strings only.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import ConfigError


@dataclasses.dataclass(frozen=True)
class VocabIdentity:
    """The model a vocabulary profile belongs to.

    architecture    the checkpoint's architecture name (``config.architectures[0]``)
    vocab_size      rows of the vocabulary (``vocab_size`` of the text config)
    tokenizer_hash  :func:`tokenizer_hash` of the tokenizer's id -> token mapping
    """

    architecture: str
    vocab_size: int
    tokenizer_hash: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "profile") -> "VocabIdentity":
        try:
            ident = cls(str(data["architecture"]), int(data["vocab_size"]), str(data["tokenizer_hash"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: model identity must have architecture, vocab_size and tokenizer_hash "
                              f"({e})") from None
        if ident.vocab_size <= 0:
            raise ConfigError(f"{source}: model identity vocab_size must be positive, got {ident.vocab_size}")
        return ident

    def mismatch(self, other: "VocabIdentity") -> list[str]:
        """Fields that differ, as ``"field: profile X, model Y"`` (empty when the models match)."""
        return [f"{f.name}: profile {getattr(self, f.name)!r}, model {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def tokenizer_hash(vocab: Mapping[str, int]) -> str:
    """SHA-256 (first 16 hex digits) of a tokenizer's token -> id mapping, independent of dict order."""
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


@dataclasses.dataclass
class BatchVocab:
    """The allowed sets of one batch, laid out for a compact LM head.

    union   (U,) ascending token ids: the LM-head rows the batch needs
    rows    (B, U) bool: request ``b`` may produce ``union[j]``
    vocab   full vocabulary size (the width of the scattered logits)
    """

    union: torch.Tensor
    rows: torch.Tensor
    vocab: int

    @classmethod
    def from_allowed(cls, allowed: Sequence[torch.Tensor], vocab: int,
                     device: torch.device | str | None = None) -> "BatchVocab":
        """From one 1-D id tensor per request (any order, duplicates allowed)."""
        if not allowed:
            raise ValueError("BatchVocab needs at least one request")
        ids = [torch.as_tensor(a, dtype=torch.long).reshape(-1).cpu() for a in allowed]
        for b, a in enumerate(ids):
            if a.numel() and (int(a.min()) < 0 or int(a.max()) >= vocab):
                raise ValueError(f"request {b}: allowed token ids must lie in [0, {vocab}), got "
                                 f"[{int(a.min())}, {int(a.max())}]")
        union = torch.unique(torch.cat(ids))
        rows = torch.zeros((len(ids), union.numel()), dtype=torch.bool)
        for b, a in enumerate(ids):
            rows[b, torch.searchsorted(union, a)] = True
        device = device if device is not None else "cpu"
        return cls(union.to(device), rows.to(device), vocab)

    @property
    def batch(self) -> int:
        return self.rows.shape[0]

    def full_mask(self) -> torch.Tensor:
        """(B, vocab) bool: the allowed sets as full-vocabulary masks."""
        m = torch.zeros((self.batch, self.vocab), dtype=torch.bool, device=self.rows.device)
        m[:, self.union] = self.rows
        return m

    def scatter(self, compact: torch.Tensor, row_of: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary logits from logits over :attr:`union`.

        ``compact`` (..., N, U) or (N, U) where dimension -2 (or, for 3-D input, dimension 0 = batch)
        runs over requests. ``row_of`` (N,) maps each compact row to its request when rows are not
        one per request in order (engines with several rows of one request). Returns (..., vocab) with
        ``-inf`` outside each request's allowed set.
        """
        if compact.shape[-1] != self.union.numel():
            raise ValueError(f"compact logits have {compact.shape[-1]} columns, the batch's union has "
                             f"{self.union.numel()}")
        if compact.dim() == 3:  # (B, S, U): request b is batch row b
            if compact.shape[0] != self.batch:
                raise ValueError(f"logits for {compact.shape[0]} requests, allowed sets for {self.batch}")
            keep = self.rows[:, None, :]
        else:
            idx = row_of if row_of is not None else torch.arange(compact.shape[0], device=self.rows.device)
            if idx.numel() != compact.shape[0]:
                raise ValueError(f"{compact.shape[0]} logit rows but {idx.numel()} row -> request entries")
            keep = self.rows.index_select(0, idx.to(self.rows.device))
        neg = torch.tensor(float("-inf"), dtype=compact.dtype, device=compact.device)
        masked = torch.where(keep.to(compact.device), compact, neg)
        out = compact.new_full((*compact.shape[:-1], self.vocab), float("-inf"))
        out.index_copy_(out.dim() - 1, self.union.to(compact.device), masked)
        return out


class VocabSelectionMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach the vocabulary-selection adapters.

    ``profile`` below is the method's own artifact (loaded by :meth:`load_profile`); adapters pass it
    back opaquely and read only :meth:`identity` and :meth:`allowed`.
    """

    @abc.abstractmethod
    def load_profile(self, source: Any) -> Any:
        """A profile from a path or a mapping (``ConfigError`` naming the file and field if invalid)."""

    @abc.abstractmethod
    def identity(self, profile: Any) -> VocabIdentity:
        """The model the profile was made for."""

    def check_model(self, profile: Any, model: VocabIdentity, source: str = "profile") -> None:
        """Raise ``ConfigError`` when ``profile`` was made for another model."""
        diff = self.identity(profile).mismatch(model)
        if diff:
            raise ConfigError(f"{source} was made for another model ({'; '.join(diff)}); build a profile for "
                              f"this model with `overdrive calibrate --method ... --model DIR`")

    @abc.abstractmethod
    def allowed(self, profile: Any, cfg: Any, prompts: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """Per request, the token ids it may produce (1-D long, ascending, unique). ``prompts[b]`` is the
        request's prompt ids, or None when the engine has none (e.g. the caller passed embeddings)."""

    @abc.abstractmethod
    def documents(self, args: Any) -> list[str]:
        """The task corpus named by the parsed ``overdrive calibrate`` arguments, as document texts."""

    def profile_options(self, args: Any) -> Any:
        """The profiling options from the parsed ``overdrive calibrate`` arguments (default: none)."""
        return None

    @abc.abstractmethod
    def build_profile(self, documents: Sequence[Sequence[int]], model: VocabIdentity, special_ids: Sequence[int],
                      token_text: Callable[[Sequence[int]], list[str]], options: Any) -> Any:
        """Profile a task corpus: ``documents`` are token-id sequences, ``special_ids`` the tokenizer's special
        tokens, ``token_text(ids)`` the text of given ids (for script filters)."""

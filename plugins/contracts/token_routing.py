"""The token-routing contract (kind ``token_routing``): a small model writes, a router sends some tokens
to a large model.

Every decoding step the small model (the SLM) produces, for each running sequence, its last-layer
hidden state (after the final norm), its raw logits and a sampled token. A router looks at
:class:`RouterInputs` built from those and scores how likely the token is to change the meaning of the
answer; when the score reaches the threshold the small token is dropped and the large model (the LLM)
produces the token at that position instead, from the same context. Both models then continue from
the accepted token. Both share one tokenizer.

What a method provides (:class:`TokenRoutingMethod`): a router loaded from a checkpoint directory,
how many top logits it reads, and its stored threshold. What a driver provides (an engine adapter):
the two models' steps. The bookkeeping between them — which tokens each model has not seen yet, when
a sequence ends, how many tokens were routed — is :class:`RoutedSequence`, shared by every driver so
the transformers reference loop and the two-engine server make the same decisions by construction.

The decision is taken on the router's *logit* ``z`` (probability ``sigmoid(z)``):
``route = z >= log(t / (1 - t))``. Threshold 0 gives ``-inf`` (every token goes to the large model,
so the output is the large model's own), threshold 1 gives ``+inf`` (no token does: the small model's
output), with no sigmoid saturation at either end.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch


@dataclasses.dataclass
class RouterInputs:
    """One row per sequence at one decoding position.

    hidden       (B, d) the small model's last-layer hidden state (after the final norm) at the
                 position whose logits produced ``token``
    topk_logits  (B, k) the k largest raw logits at that position (before temperature, penalties or
                 any other processing), sorted descending
    token        (B,) the token the small model sampled there
    """

    hidden: torch.Tensor
    topk_logits: torch.Tensor
    token: torch.Tensor

    def __post_init__(self) -> None:
        b = self.hidden.shape[0] if self.hidden.dim() == 2 else None
        if b is None:
            raise ValueError(f"RouterInputs.hidden must be (B, d), got {tuple(self.hidden.shape)}")
        if self.topk_logits.dim() != 2 or self.topk_logits.shape[0] != b:
            raise ValueError(f"RouterInputs.topk_logits must be ({b}, k), got {tuple(self.topk_logits.shape)}")
        if self.token.shape != (b,):
            raise ValueError(f"RouterInputs.token must be ({b},), got {tuple(self.token.shape)}")

    @classmethod
    def cat(cls, parts: Sequence["RouterInputs"]) -> "RouterInputs":
        return cls(torch.cat([p.hidden for p in parts]), torch.cat([p.topk_logits for p in parts]),
                   torch.cat([p.token for p in parts]))


class Router(Protocol):
    """A loaded router (plain torch). ``scores`` is batched and side-effect free."""

    #: how many top logits :attr:`RouterInputs.topk_logits` must carry
    topk: int
    #: the threshold stored with the router (used when a caller gives none)
    threshold: float

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        """(B,) float32 router logits; ``sigmoid`` of them is the probability of routing."""


def threshold_logit(threshold: float) -> float:
    """``log(t / (1 - t))``, with -inf at 0 and +inf at 1 (see the module docstring)."""
    t = float(threshold)
    if not 0.0 <= t <= 1.0 or math.isnan(t):
        raise ValueError(f"router threshold must be within [0, 1], got {threshold!r}")
    if t == 0.0:
        return -math.inf
    if t == 1.0:
        return math.inf
    return math.log(t) - math.log1p(-t)


def route_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) bool: which tokens go to the large model."""
    return scores.float() >= threshold_logit(threshold)


class TokenRoutingMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach the routing drivers."""

    @abc.abstractmethod
    def router_topk(self, router_dir: str | Path) -> int:
        """How many top logits the router in ``router_dir`` reads (cheap: no weights loaded), so an
        engine can be told what to capture before the router itself is loaded."""

    @abc.abstractmethod
    def load_router(self, router_dir: str | Path, small_model: str | Path, device: str | torch.device = "cpu"
                    ) -> Router:
        """The router in ``router_dir`` for the small model checkpoint ``small_model`` (a router made
        for another small model is rejected with a clear error)."""


# ----------------------------------------------------------------------------- shared bookkeeping
@dataclasses.dataclass
class RoutedSequence:
    """One request's state between a small and a large model, driver-independent.

    The small model sees every accepted token once (:meth:`small_feed`: the prompt first, then one
    token per step); the large model is only called on routed positions and gets everything it has not
    seen since its last call (:meth:`large_feed`), i.e. an incremental extend of the gap plus one
    sampled token, as R2R's server does.
    """

    prompt: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    tokens: list[int] = dataclasses.field(default_factory=list)
    routed: list[bool] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    small_seen: int = 0
    large_seen: int = 0

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a routed sequence needs a non-empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_token_ids = frozenset(self.stop_token_ids)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_routed(self) -> int:
        return sum(self.routed)

    @property
    def num_small(self) -> int:
        return len(self.routed) - self.num_routed

    def small_feed(self) -> list[int]:
        """Tokens the small model has not seen yet (marks them seen)."""
        ctx = self.context
        feed, self.small_seen = ctx[self.small_seen:], len(ctx)
        return feed

    def large_feed(self) -> list[int]:
        """Tokens the large model has not seen yet (marks them seen); non-empty by construction."""
        ctx = self.context
        feed, self.large_seen = ctx[self.large_seen:], len(ctx)
        return feed

    def accept(self, token: int, routed: bool) -> bool:
        """Append the token chosen at this position; returns True when the sequence has finished."""
        if self.finished:
            raise RuntimeError("accept() on a finished sequence")
        self.tokens.append(int(token))
        self.routed.append(bool(routed))
        if int(token) in self.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finished

    def stop_at_text(self) -> None:
        """Mark the sequence finished because a stop string appeared in its text (the server's job)."""
        self.finish_reason = "stop"


def routing_stats(seqs: Iterable[RoutedSequence]) -> dict[str, float | int]:
    """Totals over sequences: tokens, routed tokens, small tokens, routed fraction."""
    total = routed = 0
    for s in seqs:
        total += len(s.routed)
        routed += s.num_routed
    return {"tokens": total, "routed_tokens": routed, "small_tokens": total - routed,
            "routed_fraction": routed / total if total else 0.0}


def check_shared_tokenizer(small_tokenizer, large_tokenizer, small_name: str, large_name: str) -> None:
    """Raise ValueError naming both models unless the two tokenizers map the same strings to the same
    ids (vocabulary, added tokens, special tokens). Duck-typed on ``get_vocab()``,
    ``all_special_tokens`` and ``eos_token_id`` (transformers tokenizers)."""
    sv, lv = small_tokenizer.get_vocab(), large_tokenizer.get_vocab()
    problems = []
    if sv != lv:
        only_s = sorted(set(sv) - set(lv))[:3]
        only_l = sorted(set(lv) - set(sv))[:3]
        moved = sorted(t for t in set(sv) & set(lv) if sv[t] != lv[t])[:3]
        problems.append(f"vocabularies differ ({len(sv)} vs {len(lv)} entries; only in the small one: {only_s}, "
                        f"only in the large one: {only_l}, different ids: {moved})")
    if sorted(small_tokenizer.all_special_tokens) != sorted(large_tokenizer.all_special_tokens):
        problems.append(f"special tokens differ ({sorted(small_tokenizer.all_special_tokens)} vs "
                        f"{sorted(large_tokenizer.all_special_tokens)})")
    if small_tokenizer.eos_token_id != large_tokenizer.eos_token_id:
        problems.append(f"end-of-sequence ids differ ({small_tokenizer.eos_token_id} vs {large_tokenizer.eos_token_id})")
    if problems:
        raise ValueError(f"token routing needs one tokenizer shared by both models, but the small model "
                         f"{small_name} and the large model {large_name} differ: " + "; ".join(problems))

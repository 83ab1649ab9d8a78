"""The kinds of extension overdrive knows, and what each kind promises.

A *kind* is a framework-neutral contract: a method implements the contract for its kind, and an
adapter knows one framework and registers every method of the kinds it supports. The frameworks a
method reaches are therefore derived (``overdrive list``), never written by hand.
"""
from __future__ import annotations

import enum


class Kind(str, enum.Enum):
    """Kinds of method. The value is the stable identifier used in docs, JSON and the CLI."""

    WEIGHT_QUANT = "weight_quantization"
    KV_CACHE = "kv_cache_attention"
    TOKEN_REDUCTION = "token_reduction"
    DIT_CACHE = "dit_caching"
    FRAME_RATE = "frame_rate_schedule"
    ROUTING = "token_routing"
    EXPERT_PRUNING = "expert_pruning"
    VOCAB = "vocabulary_selection"

    @property
    def title(self) -> str:
        return _TITLES[self]

    @classmethod
    def parse(cls, value: "str | Kind") -> "Kind":
        if isinstance(value, Kind):
            return value
        for k in cls:
            if value in (k.value, k.name, k.name.lower()):
                return k
        known = ", ".join(k.value for k in cls)
        raise ValueError(f"unknown method kind {value!r}; known kinds: {known}")


_TITLES = {
    Kind.WEIGHT_QUANT: "weight quantization",
    Kind.KV_CACHE: "KV-cache quantization / attention backend",
    Kind.TOKEN_REDUCTION: "token reduction",
    Kind.DIT_CACHE: "DiT caching / attention compression",
    Kind.FRAME_RATE: "frame-rate schedule",
    Kind.ROUTING: "token routing",
    Kind.EXPERT_PRUNING: "expert pruning",
    Kind.VOCAB: "vocabulary selection",
}

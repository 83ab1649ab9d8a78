"""The token-reduction contract (kind ``token_reduction``): fewer vision tokens through the decoder.

Two ways an engine can host a token reducer, and one method serves both:

* **per layer** (transformers): the decoder runs layer by layer in Python, each layer may see fewer
  tokens than the one before and keeps its own KV length. The adapter gives the method each layer's
  input hidden states per sample and a probe for the last query token's attention; the method's
  :class:`LayerwiseReducer` answers which tokens go on and with which hidden states.
* **before the decoder** (vLLM): one KV length for every layer and a prompt whose placeholder count
  is fixed when the request is processed, so the reducer runs once on the vision embeddings of one
  video and must return exactly ``num_keep`` tokens (:meth:`TokenReductionMethod.select`).

Everything here is plain torch: the adapters know the frameworks (hooks, positions, masks, caches),
the method knows which tokens to keep.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Protocol, Sequence

import torch

from ..config import MethodConfig


@dataclasses.dataclass(frozen=True)
class VideoGrid:
    """Shape of one video's tokens as the language model sees them: ``frames`` x ``rows`` x ``cols``.

    Tokens are laid out frame-major, then row-major: token ``(t, y, x)`` is at
    ``t * rows * cols + y * cols + x``. For Qwen2-VL-family models a "frame" is a temporal patch
    (``temporal_patch_size`` input frames) and rows/cols are after the spatial merge.
    """

    frames: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("frames", "rows", "cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"VideoGrid.{name} must be a positive int, got {v!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    @property
    def num_tokens(self) -> int:
        return self.frames * self.rows * self.cols


@dataclasses.dataclass(frozen=True)
class VisionSpan:
    """One video inside one sample's token sequence: tokens ``start .. start + grid.num_tokens - 1``."""

    start: int
    grid: VideoGrid

    @property
    def stop(self) -> int:
        return self.start + self.grid.num_tokens


@dataclasses.dataclass
class Selection:
    """Result of :meth:`TokenReductionMethod.select` for one video.

    keep    (K,) ascending indices into the video's input tokens; a merged token is represented by
            the first token of its run (its position is the position the engine gives it)
    embeds  (K, D) the kept tokens' embeddings (merged runs averaged)
    merged  tokens removed by merging; pruned: tokens removed by pruning (merged + pruned = N - K)
    """

    keep: torch.Tensor
    embeds: torch.Tensor
    merged: int
    pruned: int


@dataclasses.dataclass
class Reduction:
    """One sample's tokens after one layer's reduction.

    keep    (m,) ascending indices into the sample's current tokens (those the layer was given)
    hidden  (m, D) the hidden states those tokens carry on with
    """

    keep: torch.Tensor
    hidden: torch.Tensor


#: ``probe(samples, hiddens, keeps)``: for each listed sample ``samples[i]``, the hidden states
#: ``hiddens[i]`` (m, D) of the subset ``keeps[i]`` (indices into the sample's current tokens, the
#: last token included) -> (m,) attention probabilities of the sample's last token over those
#: tokens at the current layer, averaged over heads (softmax over the subset only).
AttentionProbe = Callable[[Sequence[int], Sequence[torch.Tensor], Sequence[torch.Tensor]], list[torch.Tensor]]


class LayerwiseReducer(Protocol):
    """Per-request state of a per-layer reduction (one object per forward pass; batches supported)."""

    def step(self, layer_idx: int, hiddens: Sequence[torch.Tensor],
             probe: AttentionProbe) -> list[Reduction] | None:
        """Called before decoder layer ``layer_idx`` (0, 1, ... in order) with each sample's hidden
        states (n_b, D) of its current tokens. Returns one :class:`Reduction` per sample, or None
        when no sample changes at this layer (and none will at later layers once :attr:`done`)."""

    @property
    def done(self) -> bool:
        """True once no later layer will change anything."""

    def summary(self) -> list[dict]:
        """Per sample: vision tokens entering each layer, merged/pruned counts, achieved cost."""


class TokenReductionMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach the token-reduction adapters."""

    @abc.abstractmethod
    def resolve(self, cfg: MethodConfig, family: str) -> MethodConfig:
        """``cfg`` with options left to the model family (e.g. a similarity threshold) filled in."""

    @abc.abstractmethod
    def keep_fraction(self, cfg: MethodConfig) -> float:
        """Fraction of a video's tokens a before-the-decoder engine keeps (its placeholder budget)."""

    @abc.abstractmethod
    def select(self, embeds: torch.Tensor, grid: VideoGrid, num_keep: int, cfg: MethodConfig) -> Selection:
        """Reduce one video's embeddings (grid.num_tokens, D) to exactly ``num_keep`` tokens."""

    @abc.abstractmethod
    def layerwise(self, cfg: MethodConfig, num_layers: int, spans: Sequence[Sequence[VisionSpan]],
                  lengths: Sequence[int]) -> LayerwiseReducer:
        """A reducer for one forward pass over a batch: ``spans[b]`` are sample b's videos inside its
        ``lengths[b]`` tokens; ``num_layers`` is the decoder's real depth."""

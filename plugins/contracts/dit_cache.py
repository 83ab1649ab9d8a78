"""The DiT caching / attention-compression contract (kind ``dit_caching``).

The diffusers adapter finds the denoiser of a pipeline and describes it with :class:`DenoiserInfo`
(from a small registry of per-model metadata, not from code branches); the method attaches its
hooks and returns an :class:`Attachment` whose ``detach()`` restores the exact original model.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Protocol

import torch

from ..config import MethodConfig


@dataclasses.dataclass(frozen=True)
class DenoiserInfo:
    """What a DiT method needs to know about a denoiser, independent of the framework.

    family       model family key (``"flux"``, ``"sd3"``, ``"pixart"``, ``"wan"``, ...)
    block_lists  attribute names of the ``nn.ModuleList``s of transformer blocks, in call order
    attention    attribute name of the self-attention module inside a block
    joint_text   whether text tokens go through the same attention as image tokens (MMDiT)
    text_first   with joint_text: text tokens precede the vision tokens in the joint sequence (Flux,
                 CogVideoX) rather than follow them (SD3)
    """

    family: str
    block_lists: tuple[str, ...]
    attention: str = "attn"
    joint_text: bool = False
    text_first: bool = True

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        out: list[torch.nn.Module] = []
        for name in self.block_lists:
            out.extend(getattr(denoiser, name))
        return out


class Attachment(Protocol):
    def detach(self) -> None:
        """Remove every hook/processor the method attached; afterwards the model is as before."""


class DiTCacheMethod(abc.ABC):
    """Implement this (and return it as ``MethodSpec.impl``) to reach the diffusers adapter."""

    @abc.abstractmethod
    def attach(self, denoiser: torch.nn.Module, cfg: MethodConfig, info: DenoiserInfo) -> Attachment:
        """Attach the method to ``denoiser``; state lives in the returned attachment, never on classes."""

    def attach_pipeline(self, pipeline: object | None, denoiser: torch.nn.Module, cfg: MethodConfig,
                        info: DenoiserInfo) -> Attachment:
        """Called by the adapter, with the pipeline when one was given (``None`` for a bare denoiser).

        Override it when the method needs the pipeline (e.g. its scheduler's step count); the default
        ignores the pipeline and calls :meth:`attach`.
        """
        return self.attach(denoiser, cfg, info)

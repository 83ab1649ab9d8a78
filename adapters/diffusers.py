"""Diffusers adapter: explicit API (diffusers has no plugin entry points).

    import overdrive.diffusers as odd
    odd.enable(pipe, "ditfastattn", plan="flux.json")   # any DiT-caching method, by name
    ...
    odd.disable(pipe)                                     # model restored exactly

Per-model knowledge is metadata (:data:`DENOISERS`: which block lists, which attention module, text
layout), looked up by the denoiser's class (or a base class); add a model with
:func:`register_denoiser`. State lives in a weak map from the denoiser object to its attachment —
never on classes.
"""
from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch

from overdrive.config import MethodConfig
from overdrive.contracts.dit_cache import Attachment, DenoiserInfo, DiTCacheMethod
from overdrive.kinds import Kind

#: denoiser class name -> metadata. Class names (not classes) so this module imports no diffusers.
DENOISERS: dict[str, DenoiserInfo] = {
    "FluxTransformer2DModel": DenoiserInfo("flux", ("transformer_blocks", "single_transformer_blocks"), "attn", True),
    "SD3Transformer2DModel": DenoiserInfo("sd3", ("transformer_blocks",), "attn", True, text_first=False),
    "PixArtTransformer2DModel": DenoiserInfo("pixart", ("transformer_blocks",), "attn1", False),
    "WanTransformer3DModel": DenoiserInfo("wan", ("blocks",), "attn1", False),
    "CogVideoXTransformer3DModel": DenoiserInfo("cogvideox", ("transformer_blocks",), "attn1", True),
}

_attached: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, Attachment]]" = weakref.WeakKeyDictionary()


def register_denoiser(class_name: str, info: DenoiserInfo) -> None:
    """Teach overdrive a new denoiser class (or override an entry)."""
    DENOISERS[class_name] = info


def denoiser_of(pipe_or_model: Any) -> torch.nn.Module:
    """The DiT of a pipeline (``pipe.transformer``), or the model itself."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    model = getattr(pipe_or_model, "transformer", None)
    if isinstance(model, torch.nn.Module):
        return model
    if getattr(pipe_or_model, "unet", None) is not None:
        raise TypeError(f"{type(pipe_or_model).__name__} uses a UNet; overdrive's DiT methods need a "
                        "transformer denoiser (pipe.transformer)")
    raise TypeError(f"expected a diffusers pipeline with a .transformer or a transformer model, got "
                    f"{type(pipe_or_model).__name__}")


def denoiser_info(model: torch.nn.Module) -> DenoiserInfo:
    for cls in type(model).__mro__:
        info = DENOISERS.get(cls.__name__)
        if info is not None:
            return info
    known = ", ".join(sorted(DENOISERS))
    raise TypeError(f"{type(model).__name__} is not a known DiT denoiser; known: {known}. "
                    "Describe it with overdrive.diffusers.register_denoiser(class_name, DenoiserInfo(...)).")


def enable(pipe: Any, method: str, config: MethodConfig | Mapping[str, Any] | None = None,
           **options: Any) -> Attachment:
    """Attach DiT-caching ``method`` to ``pipe`` (a pipeline or its transformer); returns the attachment.

    ``config`` is the method's config object or a mapping of its options; keyword ``options`` override
    fields. Unknown methods/options raise errors that list what is known.
    """
    import overdrive

    spec = overdrive.get_method(method, Kind.DIT_CACHE)
    model = denoiser_of(pipe)
    if model in _attached:
        raise RuntimeError(f"{_attached[model][0]!r} is already enabled on this pipeline; call "
                           "overdrive.diffusers.disable(pipe) first")
    cfg = spec.make_config(config, **options)
    impl = spec.load_impl()
    if not isinstance(impl, DiTCacheMethod):
        raise TypeError(f"method {spec.name!r}: impl must be a DiTCacheMethod, got {type(impl).__name__}")
    pipeline = None if isinstance(pipe, torch.nn.Module) else pipe
    attachment = impl.attach_pipeline(pipeline, model, cfg, denoiser_info(model))
    _attached[model] = (spec.name, attachment)
    return attachment


def disable(pipe: Any) -> bool:
    """Detach whatever overdrive method is enabled on ``pipe``; False if none was."""
    model = denoiser_of(pipe)
    entry = _attached.pop(model, None)
    if entry is None:
        return False
    entry[1].detach()
    return True


def enabled(pipe: Any) -> str | None:
    """Name of the overdrive method enabled on ``pipe``, or None."""
    entry = _attached.get(denoiser_of(pipe))
    return entry[0] if entry else None

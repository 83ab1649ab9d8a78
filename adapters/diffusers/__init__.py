"""Diffusers adapter: explicit API (diffusers has no plugin entry points).

    import overdrive.diffusers as odd
    att = odd.enable(pipe, "ditfastattn", plan="flux.json")   # any DiT-caching method, by name
    ...
    odd.disable(pipe)                                           # model restored exactly
    plan = odd.calibrate(pipe, "ditfastattn", {"variant": "v2"}, prompt=..., num_inference_steps=28)

    vg = odd.enable(pipe, "vgdfr", keep_ratio=0.75)            # a frame-rate-schedule method
    frames = vg(**call).frames                                  # (overdrive.diffusers_frame_rate)
    vg.schedule                                                 # what it merged
    odd.enable(pipe, "ditfastattn", strategy="wars")            # a second method on the same pipeline

Per-model knowledge is metadata (:data:`DENOISERS`: which block lists, which attention module, text
layout), looked up by the denoiser's class (or a base class); add a model with
:func:`register_denoiser`. The hooks themselves are the one diffusers hook layer in
:mod:`overdrive.adapters.diffusers.hooks` (imported on first use: importing this module imports no
diffusers); methods give it framework-neutral callbacks (``overdrive.contracts.dit_cache``). State
lives in the session, held by the denoiser's own hook registry (no global map), never on classes.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from overdrive.config import ConfigError, MethodConfig
from overdrive.contracts.dit_cache import DenoiserInfo, DiTCacheMethod, DiTHooks, RotaryInfo
from overdrive.kinds import Kind
from overdrive.registry import UnknownMethodError

#: denoiser class name -> metadata. Class names (not classes) so this module imports no diffusers.
#: Video denoisers name their latent frame axis and, where the transformer computes rotary positions
#: once per call and hands them to every block, where (per-block frame positions, frame-rate methods).
DENOISERS: dict[str, DenoiserInfo] = {
    "FluxTransformer2DModel": DenoiserInfo("flux", ("transformer_blocks", "single_transformer_blocks"), "attn", True),
    "SD3Transformer2DModel": DenoiserInfo("sd3", ("transformer_blocks",), "attn", True, text_first=False),
    "PixArtTransformer2DModel": DenoiserInfo("pixart", ("transformer_blocks",), "attn1", False),
    "WanTransformer3DModel": DenoiserInfo("wan", ("blocks",), "attn1", False, frame_dim=2,
                                          rotary=RotaryInfo("rope", 3, ("rotary_emb",), token_dim=1)),
    "CogVideoXTransformer3DModel": DenoiserInfo("cogvideox", ("transformer_blocks",), "attn1", True, frame_dim=1),
    "HunyuanVideoTransformer3DModel": DenoiserInfo(
        "hunyuanvideo", ("transformer_blocks", "single_transformer_blocks"), "attn", True, text_first=False,
        frame_dim=2, rotary=RotaryInfo("rope", 4, ("freqs_cis", "image_rotary_emb"), token_dim=0)),
}

#: the kinds whose methods this adapter serves
KINDS = (Kind.DIT_CACHE, Kind.FRAME_RATE)


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


def _impl(method: str, kind: Kind = Kind.DIT_CACHE) -> tuple[Any, Any]:
    import overdrive
    from overdrive.contracts.frame_rate import FrameRateMethod

    spec = overdrive.get_method(method, kind)
    impl = spec.load_impl()
    want = {Kind.DIT_CACHE: DiTCacheMethod, Kind.FRAME_RATE: FrameRateMethod}[kind]
    if not isinstance(impl, want):
        raise TypeError(f"method {spec.name!r}: impl must be a {want.__name__}, got {type(impl).__name__}")
    return spec, impl


def _method(method: str) -> tuple[Any, Any]:
    """(spec, impl) of a method of a kind this adapter serves; the error lists every such method."""
    import overdrive

    try:
        kind = overdrive.get_method(method).kind
    except UnknownMethodError:
        kind = None
    if kind not in KINDS:
        known = ", ".join(sorted(s.name for k in KINDS for s in overdrive.list_methods(k))) or "(none installed)"
        kinds = " or ".join(k.title for k in KINDS)
        raise UnknownMethodError(f"unknown diffusers method {method!r} ({kinds}); known: {known}")
    return _impl(method, kind)


def enable(pipe: Any, method: str, config: MethodConfig | Mapping[str, Any] | None = None, **options: Any) -> Any:
    """Attach ``method`` to ``pipe`` (a pipeline, or its transformer for DiT-caching methods).

    DiT caching / attention compression: returns the method's hooks object (its counters and
    ``detach()``); the pipeline is then called as usual. Frame-rate schedule (VGDFR): returns a
    :class:`~overdrive.adapters.diffusers.frame_rate.FrameRatePipeline` to call instead of the
    pipeline (it changes the latent length mid-loop); its ``schedule`` is the last run's.

    A second, different method may be enabled on the same pipeline: the first enabled is the
    outermost at every hook level. ``config`` is the method's config object or a mapping of its
    options; keyword ``options`` override fields. Unknown methods/options raise errors that list
    what is known; nothing is attached on an error.
    """
    spec, impl = _method(method)
    model = denoiser_of(pipe)
    from overdrive.adapters.diffusers.hooks import Session, session_of

    session = session_of(model)
    if session is not None and spec.name in session.methods:
        if not (session.loaded and session.methods == [spec.name] and session.pipeline is None
                and not isinstance(pipe, torch.nn.Module)):
            raise RuntimeError(f"{spec.name!r} is already enabled on this pipeline; call "
                               "overdrive.diffusers.disable(pipe) first")
        # a quantized denoiser loaded with from_pretrained carries the method's hooks without its
        # pipeline: attach them again with the pipeline (its scheduler gives every run's step count)
        session.detach()
        session = None
    cfg = spec.make_config(config, **options)
    info = denoiser_info(model)
    pipeline = None if isinstance(pipe, torch.nn.Module) else pipe
    if spec.kind is Kind.FRAME_RATE and pipeline is None:
        raise TypeError(f"{spec.name} runs the denoising loop: pass the diffusers pipeline, not its transformer")
    fresh = session is None
    if fresh:
        session = Session(spec.name, model, info, pipeline)
    try:
        if spec.kind is Kind.FRAME_RATE:
            from overdrive.adapters.diffusers.frame_rate import FrameRatePipeline

            return FrameRatePipeline(pipeline, session, spec.name, impl, cfg)
        hooks = impl.hooks(session, cfg)
        if not isinstance(hooks, DiTHooks):
            raise TypeError(f"method {spec.name!r}: hooks() must return a DiTHooks, got {type(hooks).__name__}")
        return session.install(hooks, spec.name)
    except BaseException:
        if fresh:
            session.detach()
        raise


def disable(pipe: Any) -> bool:
    """Detach every overdrive method enabled on ``pipe``; False if none was."""
    model = denoiser_of(pipe)
    if not enabled(model):
        return False
    from overdrive.adapters.diffusers.hooks import session_of

    session_of(model).detach()
    return True


def enabled(pipe: Any) -> str | None:
    """Name of the overdrive method enabled on ``pipe`` (several: joined by '+', outermost first), or None."""
    model = denoiser_of(pipe)
    if "overdrive.adapters.diffusers.hooks" not in sys.modules:  # no session exists yet
        return None
    from overdrive.adapters.diffusers.hooks import session_of

    session = session_of(model)
    return session.method if session is not None and session.attached else None


# --------------------------------------------------------------------------------- calibration
def calibrate(pipe: Any, method: str, options: Mapping[str, Any] | None = None, /, **call_kwargs: Any) -> Any:
    """Calibrate DiT method ``method`` on one call ``pipe(**call_kwargs)``; returns its artifact (a plan).

    ``options`` are the method's calibration options (e.g. ``{"variant": "v2", "alpha": 0.2}`` for
    DiTFastAttn). The pipeline runs once unaccelerated (recorded), then the method replays the
    recorded denoiser calls through its hooks; the pipeline is left exactly as before.
    """
    spec, impl = _impl(method)
    if type(impl).calibrate is DiTCacheMethod.calibrate:
        raise ConfigError(f"method {spec.name!r} has no calibration")
    if isinstance(pipe, torch.nn.Module):
        raise TypeError("calibration runs a pipeline: pass the diffusers pipeline, not its transformer")
    model = denoiser_of(pipe)
    info = denoiser_info(model)
    if enabled(model):
        raise ConfigError(f"{enabled(model)!r} is enabled on this pipeline; disable it before calibrating")
    options = dict(options or {})
    try:
        inspect.signature(impl.calibrate).bind(None, **options)
    except TypeError as e:
        known = [n for n, p in inspect.signature(impl.calibrate).parameters.items()
                 if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and n != "run")]
        raise ConfigError(f"{spec.name} calibration options: {e}; known: {', '.join(known)}") from None
    from overdrive.adapters.diffusers.hooks import PipelineCalibration

    run = PipelineCalibration(spec.name, pipe, model, info, call_kwargs)
    try:
        return impl.calibrate(run, **options)
    finally:
        run.close()


def load_pipeline(directory: Path, dtype: str = "float32", device: str = "cpu") -> Any:
    """A pipeline saved with ``save_pretrained``; components saved as None (no text encoders) stay None."""
    if not (Path(directory) / "model_index.json").is_file():
        raise ConfigError(f"--pipeline {directory}: no model_index.json (expected a diffusers pipeline directory)")
    from diffusers import DiffusionPipeline

    index = json.loads((Path(directory) / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
    pipe = DiffusionPipeline.from_pretrained(str(directory), dtype=getattr(torch, dtype), **absent)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs_from_args(pipeline: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline call arguments from the shared calibration options, checked against the pipeline's signature."""
    params = inspect.signature(type(pipeline).__call__).parameters
    kw: dict[str, Any] = {"num_inference_steps": args.steps, "output_type": "latent",
                          "generator": torch.Generator(args.device).manual_seed(args.seed)}
    if args.prompt and args.embeds:
        raise ConfigError("give --prompt or --embeds, not both")
    if args.embeds:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not args.embeds.is_file():
            raise ConfigError(f"--embeds {args.embeds}: no such file")
        try:
            tensors = load_file(str(args.embeds))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"--embeds {args.embeds}: not a safetensors file ({e})") from None
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ConfigError(f"--embeds {args.embeds}: tensors {unknown} are not arguments of "
                              f"{type(pipeline).__name__}.__call__; expected names like "
                              f"{sorted(n for n in params if 'embeds' in n or 'mask' in n)}")
        dtype = getattr(torch, args.dtype)
        kw.update({k: (v.to(args.device, dtype) if v.is_floating_point() else v.to(args.device))
                   for k, v in tensors.items()})
    elif args.prompt:
        kw["prompt"] = list(args.prompt)
    else:
        raise ConfigError("give calibration inputs: --prompt TEXT (repeatable) or --embeds FILE.safetensors")
    for name, value in (("height", args.height), ("width", args.width), ("num_frames", args.num_frames),
                        ("guidance_scale", args.guidance_scale)):
        if value is None:
            continue
        if name not in params:
            raise ConfigError(f"--{name.replace('_', '-')}: {type(pipeline).__name__} takes no {name}")
        kw[name] = value
    return {k: v for k, v in kw.items() if k in params or k in ("num_inference_steps",)}


def video_codec(pipe: Any) -> Any:
    """The pipeline's video VAE as a framework-neutral ``VideoCodec`` (latents in the denoiser's space,
    pixels (B, C, F, H, W) in [-1, 1]); what the DLFR-VAE encode/decode (``overdrive.vgdfr.dlfr``) runs on."""
    from overdrive.adapters.diffusers.frame_rate import video_codec as codec

    return codec(pipe)


def generate_command(args: argparse.Namespace) -> int:
    """``overdrive generate --method NAME`` for any frame-rate method (its ``MethodCommand.run``): load the
    pipeline, enable the method with the options it maps (``FrameRateMethod.cli_options``), generate, and
    write a safetensors file (``frames``: (B, F, C, H, W) in [0, 1]; metadata ``schedule``: the schedule JSON)."""
    label = f"overdrive generate --method {args.method}"
    try:
        spec, impl = _impl(args.method, Kind.FRAME_RATE)
        options = impl.cli_options(args)
        pipe = load_pipeline(args.pipeline, args.dtype, args.device)
        call = call_kwargs_from_args(pipe, args)
        call["output_type"] = "pt"
        runner = enable(pipe, args.method, **options)
        with torch.no_grad():
            out = runner(**call)
    except (ConfigError, TypeError) as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    from overdrive.config import atomic_write_text

    frames = out.frames.detach().float().cpu().contiguous()
    schedule = runner.schedule.to_dict() if runner.schedule is not None else None
    _save_safetensors(args.output, {"frames": frames}, {"schedule": json.dumps(schedule), "method": args.method,
                                                        "options": json.dumps(runner.cfg.to_dict())})
    if args.schedule_out and schedule is not None:
        atomic_write_text(args.schedule_out, json.dumps(schedule, indent=1) + "\n")
    ratio = f"{schedule['keep_ratio']:.3f}" if schedule else "1"
    print(f"wrote {args.output}: frames {tuple(frames.shape)}; latent frames kept {ratio} "
          f"(groups {schedule['groups'] if schedule else '-'})")
    return 0


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    import os
    import tempfile

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def calibrate_command(args: argparse.Namespace) -> int:
    """``overdrive calibrate --method NAME`` for any DiT method (its ``MethodCommand.run``): load the
    pipeline, build the call from the shared options (``add_pipeline_arguments``), calibrate, save."""
    label = f"overdrive calibrate --method {args.method}"
    try:
        _, impl = _impl(args.method)
        options = impl.calibration_options(args)
        pipe = load_pipeline(args.pipeline, args.dtype, args.device)
        artifact = calibrate(pipe, args.method, options, **call_kwargs_from_args(pipe, args))
    except (ConfigError, TypeError) as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    if getattr(artifact, "denoiser_checkpoint", False):
        write_pipeline(args.pipeline, args.output, artifact)
    else:
        artifact.save(args.output)
    print(f"wrote {args.output}: {artifact.summary()}")
    return 0


def write_pipeline(source: Path, output: Path, artifact: Any, denoiser: str = "transformer") -> Path:
    """A pipeline directory at ``output`` (must not exist): every component of the pipeline directory
    ``source`` except its ``denoiser`` folder (hard-linked where the filesystem allows, else copied),
    and the artifact's denoiser checkpoint in its place; atomic."""
    import os
    import shutil

    from overdrive.checkpoint import atomic_directory

    source, output = Path(source), Path(output)
    if not (source / denoiser).is_dir():
        raise ConfigError(f"--pipeline {source}: no {denoiser}/ folder to replace with the quantized denoiser")

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_directory(output) as tmp:
        for entry in source.iterdir():
            if entry.name == denoiser or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=link_or_copy)
            else:
                link_or_copy(str(entry), str(tmp / entry.name))
        artifact.save(tmp / denoiser)
    return output

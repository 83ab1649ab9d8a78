"""Diffusers integration of frame-rate-schedule methods (VGDFR): a shorter latent from step K on.

Why a pipeline wrapper around the pipeline's own loop, and not hooks alone or a loop of our own.
The method must replace the loop's latent by a shorter one after K steps. Diffusers has no entry
point to add a stage to a pipeline's loop, and a denoiser hook cannot change the loop's ``latents``
variable. The one public seam that can is ``callback_on_step_end``: the video pipelines adopt the
``latents`` it returns, whatever their length, and the flow-matching Euler step that follows is
elementwise. So :class:`FrameRatePipeline` calls the user's pipeline with its own callback (chained
before the user's), and everything inside the denoiser goes through the shared hook layer: the
step-0 latent (the original noise) and per-block temporal positions (``Session.run_at_frames``).
Writing our own loop around the scheduler and transformer would duplicate every pipeline's
``__call__`` (prompt encoding, CFG variants, guidance embeddings, decode); the callback keeps the
pipeline's loop, decode and post-processing as they are.

One run (``vg(**call)``):

1. K = ``plan.step`` steps at full length; the callback of step K-1 sees x_K and knows x_{K-1}
   (the previous callback's latent, or the original noise), so x̂0 = x_K − σ_K v with
   v = (x_K − x_{K−1}) / (σ_K − σ_{K−1}) (exact for the Euler flow-matching step; no extra
   transformer call);
2. the method's schedule from x̂0 decoded by the pipeline's VAE (optionally at a lower spatial
   size), or from x̂0 latents; the identity schedule changes nothing (bit-exact);
3. x̂0 merged per group (latents, or decoded, merged as pixels and encoded again); the loop's latent
   becomes σ_K ε[first of each group] + (1 − σ_K) x̂0_merged, with ε the run's original noise;
4. the remaining steps run on the shorter latent; the blocks the method names see its frames at
   their original temporal positions, the others at 0..T'−1; other methods on the denoiser are told
   (``Session.invalidate``) so their caches of the longer latent are dropped;
5. the pipeline decodes the short latent itself (as ``"pt"``); the method restores the frame count
   (interpolation) and the result is converted to the caller's ``output_type``.

A plain ``pipe(...)`` call while the method is enabled is an error (it cannot change the latent).
Per-VAE and per-scheduler knowledge is metadata below.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from overdrive.config import ConfigError, MethodConfig
from overdrive.contracts.dit_cache import DiTHooks, ModuleCall, StepContext
from overdrive.contracts.frame_rate import (FrameRateMethod, FrameRateSchedule, VideoCodec, flow_renoise, flow_x0,
                                            group_starts, merge_groups)


@dataclasses.dataclass(frozen=True)
class VaeInfo:
    """How a video VAE's latents are normalised for the denoiser.

    normalize  "mean_std": z_denoiser = (z − latents_mean) / latents_std (per channel, from the config);
               "scaling": z_denoiser = z × scaling_factor
    """

    normalize: str


#: video VAE class name -> normalisation (the pipelines' own decode code, as metadata)
VIDEO_VAES: dict[str, VaeInfo] = {
    "AutoencoderKLWan": VaeInfo("mean_std"),
    "AutoencoderKLHunyuanVideo": VaeInfo("scaling"),
}

#: schedulers whose step is ``x + (σ_next − σ) v`` with no state carried between steps (a shorter
#: latent can follow a longer one); others are rejected with this message
FLOW_EULER = ("FlowMatchEulerDiscreteScheduler",)


def _lookup(obj: Any, table: dict[str, Any], what: str) -> Any:
    for cls in type(obj).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    raise TypeError(f"{type(obj).__name__} is not a known {what}; known: {', '.join(sorted(table))}")


class DiffusersVideoCodec(VideoCodec):
    """A pipeline's video VAE in the denoiser's latent space (:class:`VideoCodec`)."""

    def __init__(self, pipe: Any) -> None:
        self.vae = getattr(pipe, "vae", None)
        if self.vae is None:
            raise TypeError(f"{type(pipe).__name__} has no vae")
        self.info: VaeInfo = _lookup(self.vae, VIDEO_VAES, "video VAE (overdrive.adapters.diffusers.frame_rate.VIDEO_VAES)")
        self.temporal_factor = int(pipe.vae_scale_factor_temporal)
        self.spatial_factor = int(pipe.vae_scale_factor_spatial)
        self.causal_first = True
        self.frame_dim = 2

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return (torch.tensor(cfg.latents_mean).view(shape).to(z.device, z.dtype),
                torch.tensor(cfg.latents_std).view(shape).to(z.device, z.dtype))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        if self.info.normalize == "mean_std":
            mean, std = self._stats(z)
            return (z - mean) / std
        return z * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype)
        if self.info.normalize == "mean_std":
            mean, std = self._stats(z)
            z = z * std + mean
        else:
            z = z / self.vae.config.scaling_factor
        return self.vae.decode(z, return_dict=False)[0]


def video_codec(pipe: Any) -> DiffusersVideoCodec:
    """The pipeline's video VAE as a framework-neutral :class:`VideoCodec` (DLFR-VAE encode/decode)."""
    return DiffusersVideoCodec(pipe)


def check_scheduler(pipe: Any, method: str) -> None:
    sched = pipe.scheduler
    name = type(sched).__name__
    if name not in FLOW_EULER or getattr(sched.config, "stochastic_sampling", False):
        raise ConfigError(
            f"{method}: the pipeline's scheduler {name} is not supported: the latent changes length mid-run, "
            f"which needs a stateless flow-matching Euler step ({', '.join(FLOW_EULER)}, stochastic_sampling off). "
            "Swap it: pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)")


@dataclasses.dataclass
class _Run:
    noise: torch.Tensor | None = None        # the latent the loop started from (step 0's input)
    previous: torch.Tensor | None = None     # x_i, the latent the current step started from
    schedule: FrameRateSchedule | None = None
    latent_frames: int | None = None
    calls: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (step, latent frames) per denoiser call


class _FrameRateHooks(DiTHooks):
    """The frame-rate method's hooks on the denoiser: the original noise, per-block positions."""

    def __init__(self, session: Any, owner: "FrameRatePipeline") -> None:
        super().__init__(session)
        self.owner = owner
        self.positions: tuple[int, ...] | None = None  # original frame of each frame of the short latent
        self.blocks: frozenset[int] = frozenset()

    def denoiser_call(self, step: StepContext, call: ModuleCall) -> Any:
        run = self.owner._run
        if run is None:
            raise RuntimeError(f"{self.owner.name} is enabled on this pipeline: call the object "
                               "overdrive.diffusers.enable returned (vg(**inputs)) instead of the pipeline, which "
                               "cannot change the latent length mid-loop; or overdrive.diffusers.disable(pipe)")
        hidden = call.kwargs.get("hidden_states", call.args[0] if call.args else None)
        if run.noise is None:
            half = hidden.shape[0] // 2 if step.cfg_batched else 0
            run.noise = hidden[half:].detach().clone()
            run.latent_frames = hidden.shape[self.session.info.frame_dim]
        run.calls.append((step.step, hidden.shape[self.session.info.frame_dim]))
        return call.run()

    def block_call(self, step: StepContext, block: int, call: ModuleCall) -> Any:
        if self.positions is not None and block in self.blocks:
            return self.session.run_at_frames(call, self.positions)
        return call.run()


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


class FrameRatePipeline:
    """A frame-rate method enabled on a pipeline: call it like the pipeline (``vg(**inputs)``).

    ``schedule``: the last run's :class:`FrameRateSchedule` (its ``to_dict()`` is the record);
    ``schedules``: every run's; ``denoiser_calls``: (step, latent frames) of each denoiser call of
    the last run. ``detach()`` removes the method (``overdrive.diffusers.disable(pipe)`` removes all).
    """

    def __init__(self, pipe: Any, session: Any, name: str, method: FrameRateMethod, cfg: MethodConfig) -> None:
        self.pipe, self.session, self.name, self.method, self.cfg = pipe, session, name, method, cfg
        self.info = session.info
        if self.info.frame_dim is None:
            raise TypeError(f"{name} needs a video denoiser; {session.architecture} has no frame axis in its metadata")
        check_scheduler(pipe, name)
        self.codec = DiffusersVideoCodec(pipe)
        self.blocks = method.original_position_blocks(len(session.blocks), cfg)
        if self.blocks and self.info.rotary is None:
            raise ConfigError(f"{name}: {session.architecture} has no per-block rotary metadata, so no block can see "
                              "the original positions; set original_position_blocks='none'")
        method.interpolator(cfg)  # fail now on an interpolator that does not import
        self._run: _Run | None = None
        self.schedule: FrameRateSchedule | None = None
        self.schedules: list[FrameRateSchedule] = []
        self.denoiser_calls: list[tuple[int, int]] = []
        self.hooks = session.install(_FrameRateHooks(session, self), name)

    def detach(self) -> None:
        self.hooks.detach()

    # -- one run ----------------------------------------------------------------------------------
    def __call__(self, **kwargs: Any) -> Any:
        """Run the pipeline with the method; returns the pipeline's output (its ``schedule`` attribute
        and ``self.schedule`` are the run's schedule; with ``return_dict=False`` a tuple (frames,))."""
        if not any(h is self.hooks for _, h in self.session.stack):
            raise RuntimeError(f"{self.name} was disabled on this pipeline; enable it again")
        pipe = self.pipe
        steps = kwargs.get("num_inference_steps", _call_default(pipe, "num_inference_steps", None))
        plan = self.method.plan(self.cfg, int(steps))
        self._run = run = _Run()
        try:
            if plan is None:
                out = pipe(**kwargs)
            else:
                out = self._compacting_call(run, plan, kwargs)
        finally:
            self.positions_off()
            if run.schedule is None and run.latent_frames is not None:
                run.schedule = FrameRateSchedule.identity(run.latent_frames, temporal_factor=self.codec.temporal_factor)
            if run.schedule is not None:
                self.schedule = run.schedule
                self.schedules.append(run.schedule)
            self.denoiser_calls = list(run.calls)
            self._run = None
        if not isinstance(out, tuple):
            out.schedule = self.schedule  # an attribute, not an output field: to_tuple() is unchanged
        return out

    def _compacting_call(self, run: _Run, plan: Any, kwargs: dict[str, Any]) -> Any:
        pipe = self.pipe
        check_scheduler(pipe, self.name)
        output_type = kwargs.get("output_type", _call_default(pipe, "output_type", "np"))
        return_dict = kwargs.get("return_dict", True)
        user_cb = kwargs.pop("callback_on_step_end", None)
        inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"]
        inputs = list(getattr(user_cb, "tensor_inputs", None) or inputs)
        call = dict(kwargs, output_type="latent" if output_type == "latent" else "pt", return_dict=True,
                    callback_on_step_end=self._callback(run, plan, user_cb),
                    callback_on_step_end_tensor_inputs=list(dict.fromkeys(["latents", *inputs])))
        out = pipe(**call)
        frames = out.frames
        s = run.schedule
        if output_type != "latent":
            if s is not None and not s.is_identity:
                frames = self.method.restore(frames, s, 1, self.cfg)
            frames = self._convert(frames, output_type)
        out.frames = frames
        return out if return_dict else (frames,)

    def positions_off(self) -> None:
        self.hooks.positions, self.hooks.blocks = None, frozenset()

    def _convert(self, frames: torch.Tensor, output_type: str) -> Any:
        """(B, F, C, H, W) in [0, 1] as the pipeline's post-processing would give it."""
        if output_type == "pt":
            return frames
        vp = self.pipe.video_processor
        if output_type == "np":
            return frames.permute(0, 1, 3, 4, 2).float().cpu().numpy()
        if output_type == "pil":
            return [vp.numpy_to_pil(f.permute(0, 2, 3, 1).float().cpu().numpy()) for f in frames]
        raise ValueError(f"{output_type} does not exist. Please choose one of ['np', 'pt', 'pil', 'latent']")

    def _callback(self, run: _Run, plan: Any, user_cb: Callable | None) -> Callable:
        def callback(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            latents = kw["latents"]
            result: dict[str, Any] = {}
            if i == plan.step - 1:
                short = self._compact(run, plan, latents, i)
                if short is not None:
                    latents = result["latents"] = kw["latents"] = short
            if user_cb is not None:
                result.update(user_cb(pipe, i, t, kw) or {})
                latents = result.get("latents", latents)
            run.previous = latents
            return result
        return callback

    def _compact(self, run: _Run, plan: Any, latents: torch.Tensor, i: int) -> torch.Tensor | None:
        fd, codec, method, cfg = self.info.frame_dim, self.codec, self.method, self.cfg
        sigmas = self.pipe.scheduler.sigmas
        before = run.previous if run.previous is not None else run.noise
        if before is None:
            raise RuntimeError(f"{self.name}: the denoiser was not called before step {i} ended")
        x0 = flow_x0(before, latents, float(sigmas[i]), float(sigmas[i + 1]))
        frames = x0.shape[fd]
        r = codec.temporal_factor
        with torch.no_grad():
            if plan.fixed is not None:
                schedule = plan.fixed
                if schedule.latent_frames != frames or schedule.temporal_factor != r or not schedule.causal_first:
                    raise ConfigError(f"{self.name}: the recorded schedule covers {schedule.latent_frames} latent frames "
                                      f"of {schedule.temporal_factor} pixel frames each; this run has {frames} of {r}")
            elif plan.estimate == "pixels":
                small = x0.movedim(fd, 2)
                d = (min(plan.downsample, small.shape[-2]), min(plan.downsample, small.shape[-1]))
                if d != (1, 1):
                    small = F.avg_pool3d(small, (1, *d))
                pixels = ((codec.decode(small).float() + 1) / 2).clamp(0, 1).movedim(2, 1)
                schedule = method.schedule(pixels, frames, cfg, pixels=True, temporal_factor=r, causal_first=True)
            else:
                schedule = method.schedule(x0.movedim(fd, 1), frames, cfg, pixels=False, temporal_factor=r,
                                           causal_first=True)
            schedule = dataclasses.replace(schedule, step=plan.step)
            run.schedule = schedule
            if schedule.is_identity:
                return None
            if plan.merge == "latents":
                merged = method.merge(x0, schedule, fd, cfg)
            else:
                video = codec.decode(x0.movedim(fd, 2))
                merged = codec.encode(merge_groups(video, schedule.pixel_groups(), dim=2)).to(x0.dtype).movedim(2, fd)
            if merged.shape[fd] != schedule.compact_frames:
                raise RuntimeError(f"{self.name}: merged x̂0 has {merged.shape[fd]} frames, the schedule "
                                   f"{schedule.compact_frames}")
            noise = group_starts(run.noise, schedule.groups, fd)
            short = flow_renoise(merged, noise, float(sigmas[i + 1])).to(latents.dtype)
        self.hooks.positions, self.hooks.blocks = schedule.starts, self.blocks
        self.session.invalidate()
        return short

"""Rotations for 4-bit weights with 8-bit (or 4-bit) activations, QuaRot/SpinQuant style.

Rotating a linear layer's input space by an orthogonal ``T`` (inputs ``x -> x T``, weights ``W -> W T``)
leaves its output unchanged and spreads outlier channels over all channels, so per-output-channel weight
scales and per-token activation scales lose less. On a Llama/Qwen2-style decoder, through the LLM
calibration layer (:mod:`overdrive.contracts.llm_calibration`: the model's ends, then every decoder block
by role, each on the calibration device):

* **residual** (offline; the checkpoint needs nothing at run time): every RMSNorm's weight is folded into
  the linears reading its output (q, k, v; gate, up; the LM head) and the norm's weight set to 1; the
  residual stream is rotated by a seeded random Hadamard ``R`` (:func:`overdrive.kernels.random_hadamard`;
  hidden sizes that are not powers of two, e.g. 576 = 9 x 64, get an orthogonal 9 x 9 factor with the
  64-Hadamard): embedding ``E R``, readers ``W R``, writers (o_proj, down_proj) ``R^T W`` (bias ``b R``).
  An RMSNorm without weight commutes with ``R`` (the root mean square over the whole vector is
  rotation-invariant). A tied LM head is untied first (it absorbs the final norm; the embedding does
  not). Also offline: when the head size is a power of two, each attention head's values are rotated by
  a Hadamard of the head size (v_proj's output rows ``H^T W``, o_proj's input columns ``W H``): attention
  mixes tokens, not channels, so the attention output is rotated the same way.
* **full**: also an online Hadamard of block ``online_block(intermediate)`` on down_proj's inputs (after
  the gated activation, where nothing can be folded), with down_proj's weight transformed the same way.
  The checkpoint records the block (``MBQConfig.online_hadamard``); MBQ's runtime applies it before every
  ``down_proj`` matmul (any engine: :meth:`overdrive.mbq.method.MBQMethod.apply`); during calibration a
  forward pre-hook on each down_proj applies it.

The float model's function is unchanged (tested in float64). Vision-language models are refused: the
vision tower's projector writes into the residual stream too and is not rotated here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import LLMCalibration
from overdrive.kernels import hadamard_transform, random_hadamard

MODES = ("none", "residual", "full")
#: the smallest online Hadamard block worth applying
MIN_ONLINE_BLOCK = 32


def online_block(intermediate: int, cap: int = 4096) -> int:
    """The online Hadamard block for down_proj: the largest power of two dividing ``intermediate`` (at
    most ``cap``)."""
    b = intermediate & -intermediate
    while b > cap:
        b //= 2
    return b


def check_rotation(mode: str, intermediate: int | None = None, is_vlm: bool = False, model: str = "the model"
                   ) -> int:
    """Validate ``--rotate`` for a model before any work; returns the online block (0 unless "full")."""
    if mode not in MODES:
        raise ConfigError(f"--rotate must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    if is_vlm:
        raise ConfigError(f"--rotate {mode}: {model} is a vision-language model; its vision projector writes into "
                          "the residual stream, which this rotation does not cover (quantize without --rotate)")
    if mode == "residual":
        return 0
    if intermediate is None:
        raise ConfigError(f"--rotate full: {model} declares no intermediate_size")
    block = online_block(intermediate)
    if block < MIN_ONLINE_BLOCK:
        raise ConfigError(f"--rotate full: intermediate size {intermediate} of {model} has no power-of-two factor "
                          f">= {MIN_ONLINE_BLOCK} for the online Hadamard before down_proj (use --rotate residual)")
    return block


def online_hadamard_hook(block: int) -> Callable[..., tuple]:
    """A forward pre-hook applying the online Hadamard to a linear's input (the calibration-time runtime)."""
    def pre(_m: torch.nn.Module, args: tuple) -> tuple:
        return (hadamard_transform(args[0], block=block), *args[1:])
    return pre


def _check_rmsnorm(name: str, norm: torch.nn.Module) -> None:
    """A norm rotation can pass through: ``norm(x) = x / rms(x) * weight`` (checked on a probe with a
    large mean, which a LayerNorm would remove), a 1-D weight and no bias."""
    w = getattr(norm, "weight", None)
    if getattr(norm, "bias", None) is not None or not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise ConfigError(f"--rotate: {name} ({type(norm).__name__}) is not an RMSNorm with a weight and no bias; "
                          "rotation supports Llama/Qwen2-style decoders")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.numel(), generator=g, dtype=torch.float64) + 3.0)
    want = x / x.pow(2).mean(-1, keepdim=True).sqrt() * w.detach().to("cpu", torch.float64)
    with torch.no_grad():
        got = norm(x.to(w.device, w.dtype)).to("cpu", torch.float64)
    if not torch.allclose(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max())):
        raise ConfigError(f"--rotate: {name} ({type(norm).__name__}) does not compute x / rms(x) * weight; "
                          "rotation supports RMSNorm decoders (Llama/Qwen2-style)")


@torch.no_grad()
def _fuse_norm(norm: torch.nn.Module, readers: list[torch.nn.Module]) -> None:
    g = norm.weight.detach().to(torch.float64)
    for lin in readers:
        lin.weight.copy_(lin.weight.to(torch.float64) * g.to(lin.weight.device)[None, :])
    norm.weight.fill_(1.0)


@torch.no_grad()
def _rot_in(lin: torch.nn.Module, rot: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """A layer reading the rotated space: ``W -> W T``."""
    lin.weight.copy_(rot(lin.weight.to(torch.float64)))


@torch.no_grad()
def _rot_out(lin: torch.nn.Module, rot: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """A layer writing into the rotated space: ``W -> T^T W``, bias ``b -> b T``."""
    lin.weight.copy_(rot(lin.weight.to(torch.float64).T).T)
    if getattr(lin, "bias", None) is not None:
        lin.bias.copy_(rot(lin.bias.to(torch.float64)))


def rotate_block(roles: Mapping[str, torch.nn.Module], residual: Callable[[torch.Tensor], torch.Tensor],
                 head_size: int, online: int, index: int = 0) -> None:
    """Rotate one decoder block in place, given its sub-modules by role (see the module doc)."""
    _check_rmsnorm(f"layer {index} attention norm", roles["attn_norm"])
    _check_rmsnorm(f"layer {index} MLP norm", roles["mlp_norm"])
    _fuse_norm(roles["attn_norm"], [roles["q"], roles["k"], roles["v"]])
    _fuse_norm(roles["mlp_norm"], [roles["gate"], roles["up"]])
    for r in ("q", "k", "v", "gate", "up"):
        _rot_in(roles[r], residual)
    for r in ("o", "down"):
        _rot_out(roles[r], residual)
    if head_size & (head_size - 1) == 0:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return hadamard_transform(t, block=head_size)

        _rot_out(roles["v"], heads)
        _rot_in(roles["o"], heads)
    if online:
        _rot_in(roles["down"], lambda t: hadamard_transform(t, block=online))


@torch.no_grad()
def rotate(run: LLMCalibration, mode: str, seed: int = 0) -> tuple[int, list[Any]]:
    """Rotate the model of ``run`` in place (function-preserving), block by block on the calibration device.

    Returns (the online Hadamard block, 0 unless ``mode`` is "full"; the forward pre-hook handles that
    apply it to every down_proj during calibration: remove them when done).
    """
    geo = run.geometry
    online = check_rotation(mode, geo.intermediate_size or None, geo.is_vlm, geo.architecture)
    if mode == "none":
        return 0, []
    ends = run.ends(untie=True)
    _check_rmsnorm("final norm", ends.final_norm)
    residual = random_hadamard(geo.hidden_size, seed=seed)
    emb = ends.embedding
    emb.weight.copy_(residual(emb.weight.to(torch.float64)))
    _fuse_norm(ends.final_norm, [ends.head])
    _rot_in(ends.head, residual)
    hooks = []
    try:
        for block in run.blocks([], desc=f"rotate ({mode})"):
            rotate_block(block.roles, residual, geo.head_size, online, block.index)
            if online:
                hooks.append(block.roles["down"].register_forward_pre_hook(online_hadamard_hook(online)))
    except BaseException:
        for h in hooks:
            h.remove()
        raise
    return online, hooks

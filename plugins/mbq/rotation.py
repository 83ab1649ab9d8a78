"""Rotations for 4-bit weights with 8-bit (or 4-bit) activations, QuaRot/SpinQuant style.

Rotating a layer's input space by an orthogonal ``T`` (``x -> x T``, weights ``W -> W T``) leaves its
output unchanged and spreads outlier channels over all channels, so per-channel weight scales and
per-token activation scales lose less. On a Llama-style decoder (torch modules only, no framework):

* **residual** (offline, no runtime change): every RMSNorm's weight is folded into the linears that
  read its output (q, k, v; gate, up; the LM head), the norms become weightless (weight 1), and the
  residual stream is rotated by a seeded random Hadamard ``R`` (:func:`overdrive.kernels.random_hadamard`;
  hidden sizes that are not powers of two, e.g. 576 = 9 x 64, get an orthogonal 9 x 9 block with the
  64-Hadamard): embeddings ``E R``, readers ``W R``, writers (o_proj, down_proj) ``R^T W``. RMSNorm
  commutes with ``R`` (the mean square over the full vector is rotation-invariant). Tied embeddings
  are untied (the LM head absorbs the final norm's weight).
* **online** (``full``): down_proj's inputs (after the SiLU gate, where nothing can be folded) are
  rotated at run time by a block-diagonal Hadamard of block ``online_block`` (the largest power of two
  dividing the intermediate size, or less), and down_proj's weight by the same transform. The
  checkpoint records the block (``MBQConfig.online_hadamard``); MBQ's runtime applies it to the input
  of every ``down_proj`` before its quantized matmul (any backend). During calibration a forward
  pre-hook applies it.

The float model's function is unchanged (tested in float64 to 1e-6).
"""
from __future__ import annotations

from typing import Any

import torch

from overdrive.config import ConfigError
from overdrive.kernels import hadamard_transform, random_hadamard

MODES = ("none", "residual", "full")


def _owner_of_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    from .calibrate import decoder_layers

    layers = decoder_layers(model)
    for mod in model.modules():
        if getattr(mod, "layers", None) is layers:
            return mod, layers
    raise ConfigError(f"{type(model).__name__}: the decoder's layer list has no owning module")


def _check_rmsnorm(name: str, norm: torch.nn.Module) -> None:
    if getattr(norm, "bias", None) is not None or getattr(norm, "weight", None) is None or norm.weight.dim() != 1:
        raise ConfigError(f"--rotate: {name} ({type(norm).__name__}) is not an RMSNorm with a weight and no bias; "
                          "rotation supports Llama/Qwen2-style decoders")


@torch.no_grad()
def _fuse_norm(norm: torch.nn.Module, readers: list[torch.nn.Linear]) -> None:
    g = norm.weight.detach().to(torch.float64)
    for lin in readers:
        lin.weight.copy_((lin.weight.to(torch.float64) * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _rot_in(lin: torch.nn.Module, rot) -> None:
    """A layer reading the rotated space: W -> W T (rows transformed)."""
    lin.weight.copy_(rot(lin.weight.to(torch.float64)).to(lin.weight.dtype))


def _rot_out(lin: torch.nn.Linear, rot) -> None:
    """A layer writing into the rotated space: W -> T^T W; bias -> bias T."""
    lin.weight.copy_(rot(lin.weight.to(torch.float64).T).T.to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(rot(lin.bias.to(torch.float64)).to(lin.bias.dtype))


def online_block(intermediate: int, cap: int = 4096) -> int:
    """The online Hadamard block for down_proj: the largest power of two dividing ``intermediate``
    (at most ``cap``)."""
    b = intermediate & -intermediate
    while b > cap:
        b //= 2
    return b


def online_hadamard_hook(block: int):
    """A forward pre-hook applying the online Hadamard to a linear's input (calibration-time runtime)."""
    def pre(_m: torch.nn.Module, args: tuple) -> tuple:
        return (hadamard_transform(args[0], block=block), *args[1:])
    return pre


@torch.no_grad()
def rotate_model(model: torch.nn.Module, mode: str = "full", seed: int = 0) -> dict[str, Any]:
    """Rotate a Llama-style (vision-)language model's decoder in place (function-preserving).

    Returns what the checkpoint must record: ``{"rotation": mode, "online_hadamard": block or 0}``.
    In ``full`` mode each ``down_proj`` also gets a forward pre-hook applying the online Hadamard, and
    the attribute ``overdrive_online_hadamard`` (the block), so calibration sees the rotated runtime.
    """
    if mode not in MODES:
        raise ConfigError(f"--rotate must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return {"rotation": "none", "online_hadamard": 0}
    owner, layers = _owner_of_layers(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    final = getattr(owner, "norm", None)
    if head is None or final is None:
        raise ConfigError(f"--rotate: {type(model).__name__} has no LM head or final norm where a Llama-style "
                          "decoder has them")
    for i, layer in enumerate(layers):
        _check_rmsnorm(f"layer {i} input_layernorm", layer.input_layernorm)
        _check_rmsnorm(f"layer {i} post_attention_layernorm", layer.post_attention_layernorm)
    _check_rmsnorm("final norm", final)
    if head.weight is emb.weight:  # tied: the head absorbs the final norm, the embedding does not
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        for conf in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
            if conf is not None and hasattr(conf, "tie_word_embeddings"):
                conf.tie_word_embeddings = False
    d = emb.weight.shape[1]
    rh = random_hadamard(d, seed=seed)

    emb.weight.copy_(rh(emb.weight.to(torch.float64)).to(emb.weight.dtype))
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        _fuse_norm(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        _fuse_norm(layer.post_attention_layernorm, [m.gate_proj, m.up_proj])
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _rot_in(lin, rh)
        for lin in (a.o_proj, m.down_proj):
            _rot_out(lin, rh)
    _fuse_norm(final, [head])
    _rot_in(head, rh)
    block = 0
    if mode == "full":
        block = online_block(layers[0].mlp.down_proj.in_features)
        for layer in layers:
            down = layer.mlp.down_proj
            _rot_in(down, lambda w: hadamard_transform(w, block=block))
            down.register_forward_pre_hook(online_hadamard_hook(block))
            down.overdrive_online_hadamard = block
    return {"rotation": mode, "online_hadamard": block}

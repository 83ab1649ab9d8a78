"""Tiny diffusers pipelines driven by prompt embeddings (no text encoders: those need downloads).

``tiny_pipeline(family)`` builds a seeded, random-weight pipeline in well under a second;
``pipeline_inputs(family, ...)`` gives the keyword arguments for ``pipe(**inputs)``, including
negative embeddings wherever the pipeline runs classifier-free guidance. Per-family knowledge is the
data table :data:`FAMILIES`, not code branches.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Family:
    pipeline: str                       # diffusers pipeline class
    transformer: tuple[str, dict]       # (class, config)
    vae: tuple[str, dict]
    scheduler: tuple[str, dict]
    none_components: tuple[str, ...]    # text encoders / tokenizers passed as None
    embeds: dict[str, tuple[int, ...]]  # input name -> shape without the batch dim
    defaults: dict[str, Any]            # other __call__ kwargs (size, guidance, ...)
    cfg_embeds: tuple[str, ...] = ()    # names whose "negative_" twins are needed under CFG


_KL = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
           norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
           scaling_factor=1.5035)

FAMILIES: dict[str, Family] = {
    "flux": Family(
        "FluxPipeline",
        ("FluxTransformer2DModel", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])),
        ("AutoencoderKL", {**_KL, "latent_channels": 1}),
        ("FlowMatchEulerDiscreteScheduler", {}),
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        {"prompt_embeds": (12, 32), "pooled_prompt_embeds": (32,)},
        dict(height=16, width=16, guidance_scale=3.5),
    ),
    "sd3": Family(
        "StableDiffusion3Pipeline",
        ("SD3Transformer2DModel", dict(sample_size=32, patch_size=1, in_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                       joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)),
        ("AutoencoderKL", {**_KL, "latent_channels": 4}),
        ("FlowMatchEulerDiscreteScheduler", {}),
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
        {"prompt_embeds": (12, 32), "pooled_prompt_embeds": (64,)},
        dict(height=16, width=16, guidance_scale=5.0),
        cfg_embeds=("prompt_embeds", "pooled_prompt_embeds"),
    ),
    "pixart": Family(
        "PixArtAlphaPipeline",
        ("PixArtTransformer2DModel", dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                          num_attention_heads=2, in_channels=4, cross_attention_dim=16,
                                          out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                          num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                          norm_elementwise_affine=False, norm_eps=1e-6,
                                          use_additional_conditions=False, caption_channels=32)),
        ("AutoencoderKL", {**_KL, "latent_channels": 4}),
        ("DDIMScheduler", {}),
        ("text_encoder", "tokenizer"),
        {"prompt_embeds": (12, 32), "prompt_attention_mask": (12,)},
        dict(height=16, width=16, guidance_scale=4.5, use_resolution_binning=False, negative_prompt=None),
        cfg_embeds=("prompt_embeds", "prompt_attention_mask"),
    ),
    "wan": Family(
        "WanPipeline",
        ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                       in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                       num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                       rope_max_seq_len=32)),
        ("AutoencoderKLWan", dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])),
        ("FlowMatchEulerDiscreteScheduler", {"shift": 7.0}),
        ("text_encoder", "tokenizer"),
        {"prompt_embeds": (12, 32)},
        dict(height=16, width=16, num_frames=9, guidance_scale=5.0),
        cfg_embeds=("prompt_embeds",),
    ),
    "hunyuanvideo": Family(
        "HunyuanVideoPipeline",
        ("HunyuanVideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
                                                attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                rope_axes_dim=(2, 4, 4))),
        ("AutoencoderKLHunyuanVideo", dict(in_channels=3, out_channels=3, latent_channels=4,
                                           down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                           up_block_types=("HunyuanVideoUpBlock3D",) * 4,
                                           block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                           spatial_compression_ratio=8, temporal_compression_ratio=4)),
        ("FlowMatchEulerDiscreteScheduler", {"shift": 7.0}),
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        {"prompt_embeds": (12, 16), "pooled_prompt_embeds": (8,), "prompt_attention_mask": (12,)},
        dict(height=16, width=16, num_frames=9, guidance_scale=6.0),  # embedded guidance (no CFG branch)
    ),
}


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown pipeline family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def _build(spec: tuple[str, dict], module: Any) -> Any:
    cls, cfg = spec
    return getattr(module, cls)(**cfg)


def tiny_pipeline(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A seeded tiny ``family`` pipeline ("flux", "sd3", "pixart", "wan", "hunyuanvideo") on CPU."""
    fam = _family(family)
    diffusers = importlib.import_module("diffusers")
    torch.manual_seed(seed)
    transformer = _build(fam.transformer, diffusers).eval()
    if dtype != torch.float32:
        transformer.to(dtype)
    torch.manual_seed(seed + 1)
    vae = _build(fam.vae, diffusers).eval()
    scheduler = _build(fam.scheduler, diffusers)
    components = {"transformer": transformer, "vae": vae, "scheduler": scheduler,
                  **{c: None for c in fam.none_components}}
    pipe = getattr(diffusers, fam.pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs(family: str, batch: int = 1, seed: int = 0, num_inference_steps: int = 2,
                    guidance: bool = True, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``tiny_pipeline(family)(**inputs)``: embeddings, size, steps, generator.

    ``guidance=False`` turns classifier-free guidance off (guidance_scale 1, no negative embeds).
    Any ``__call__`` argument can be overridden (``height``, ``output_type``, ...).
    """
    fam = _family(family)
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {}
    for name, shape in fam.embeds.items():
        inputs[name] = _embed(name, (batch, *shape), g)
    kwargs = dict(fam.defaults)
    if fam.cfg_embeds:
        if guidance:
            for name in fam.cfg_embeds:
                inputs[f"negative_{name}"] = _embed(name, (batch, *fam.embeds[name]), g)
        else:
            kwargs["guidance_scale"] = 1.0
    return {**inputs, **kwargs, "num_inference_steps": num_inference_steps,
            "generator": torch.Generator().manual_seed(seed), "output_type": "pt", **overrides}


def _embed(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("attention_mask"):
        return torch.ones(shape, dtype=torch.long)
    return torch.randn(shape, generator=g)


FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def module_state(model: torch.nn.Module) -> tuple[dict, dict]:
    """Everything detaching a method must restore: per module its attributes, diffusers hooks and
    processor; every parameter and buffer (object, storage and values)."""
    mods = {}
    for name, m in model.named_modules():
        registry = vars(m).get("_diffusers_hook")
        mods[name] = (sorted(vars(m)), tuple(registry._hook_order) if registry is not None else None,
                      id(getattr(m, "processor", None)), vars(m).get("forward"))
    tensors = {n: (t, t.data_ptr(), t.detach().clone())
               for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    return mods, tensors


def assert_same_module_state(before: tuple[dict, dict], after: tuple[dict, dict]) -> None:
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    for n, (t, ptr, val) in before[1].items():
        t2, ptr2, _ = after[1][n]
        assert t2 is t and ptr2 == ptr and torch.equal(t2, val), n

"""Tiny MoE checkpoints (random weights, peaked logits) that transformers and vLLM load: Mixtral,
Qwen2-MoE (shared expert) and Qwen3-MoE. Sizes are multiples of 32 (vLLM's CPU MoE path) and the
routers are scaled up so routing is far from uniform (pruning then changes the output measurably)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .cache import cached_build
from .llm import save_peaked
from .tokenizer import save_tokenizer, token_id

BUILDER_VERSION = 1

COMMON = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)

#: family -> (config class, model class, family-specific config)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=8,
                                                             num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=128, moe_intermediate_size=64,
                                                                 shared_expert_intermediate_size=64, num_experts=8,
                                                                 num_experts_per_tok=2, norm_topk_prob=False,
                                                                 decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=128, moe_intermediate_size=64,
                                                                 num_experts=8, num_experts_per_tok=2,
                                                                 norm_topk_prob=True, decoder_sparse_step=1,
                                                                 head_dim=32)),
}

#: router weights are multiplied by this (random routers are nearly uniform otherwise)
ROUTER_SCALE = 6.0


def tiny_moe(family: str = "mixtral", dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """Folder of a tiny MoE checkpoint of ``family`` (config, safetensors, tokenizer)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; known: {sorted(FAMILIES)}")
    cfg = {**COMMON, **FAMILIES[family][2], **overrides}
    params = {"builder": "tiny_moe", "version": BUILDER_VERSION, "family": family, "dtype": dtype, "seed": seed,
              "config": cfg}
    return cached_build(f"tiny-{family}", params, lambda out: _build(out, family, cfg, dtype, seed))


def _build(out: Path, family: str, cfg: dict, dtype: str, seed: int) -> None:
    import transformers

    conf_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family][:2])
    save_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    eos, pad = token_id(out, "<|im_end|>"), token_id(out, "<|endoftext|>")
    config = conf_cls(vocab_size=vocab, bos_token_id=None, eos_token_id=eos, pad_token_id=pad, **cfg)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"):
                layer.mlp.gate.weight.normal_(0.0, 0.02 * ROUTER_SCALE)
    save_peaked(model, out, dtype)

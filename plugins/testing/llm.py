"""Tiny Llama-style LLM checkpoint (random weights, peaked logits) that transformers and vLLM load."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .cache import cached_build
from .tokenizer import save_tokenizer, token_id

BUILDER_VERSION = 1

#: config of the tiny Llama: head_dim 32 (vLLM's CPU attention needs 32..512), GQA 4:2, 2 layers
LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)

#: scale of the LM head: random tiny models have nearly flat logits, so greedy choices flip under a
#: different summation order; a large head makes the top-1 margin large (docs/architecture.md, "Comparing engines")
LOGIT_SCALE = 24.0


def tiny_llama(dtype: str = "float32", seed: int = 0, **overrides: int | float | bool) -> Path:
    """Folder of a tiny Llama checkpoint (config, safetensors, tokenizer, generation config)."""
    cfg = {**LLAMA, **overrides}
    params = {"builder": "tiny_llama", "version": BUILDER_VERSION, "dtype": dtype, "seed": seed, "config": cfg}
    return cached_build("tiny-llama", params, lambda out: _build(out, cfg, dtype, seed))


def _build(out: Path, cfg: dict, dtype: str, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    save_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    eos, pad = token_id(out, "<|im_end|>"), token_id(out, "<|endoftext|>")
    config = LlamaConfig(vocab_size=vocab, bos_token_id=None, eos_token_id=eos, pad_token_id=pad, **cfg)
    torch.manual_seed(seed)
    save_peaked(LlamaForCausalLM(config), out, dtype)


def save_peaked(model: torch.nn.Module, out: Path, dtype: str) -> None:
    """Scale the LM head (peaked logits), cast, and save a freshly initialised model."""
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.to(getattr(torch, dtype))
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)

"""Tiny LLaVA-OneVision checkpoint (SigLIP tower + Qwen2 decoder) with its processor, for transformers.

Built locally from configs with seeded random weights (no downloads). Video frames are 112x112:
8x8 SigLIP patches, pooled 2x2 into 4x4 = 16 language-model tokens per frame, plus one newline token
after the video (LLaVA-OneVision's layout). The video/image placeholders are the shared local
tokenizer's ``<|video_pad|>`` / ``<|image_pad|>``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .cache import cached_build
from .llm import save_peaked
from .tokenizer import save_tokenizer, token_id

BUILDER_VERSION = 1

#: Qwen2 decoder: head_dim 32, four layers (so per-layer token reduction has layers to work with)
TEXT = dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=False)
VISION = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=2, image_size=112, patch_size=14)
SIZE = {"height": 112, "width": 112}
PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224]]


def tiny_llava_onevision(dtype: str = "float32", seed: int = 0) -> Path:
    """Folder of a tiny LLaVA-OneVision checkpoint with tokenizer, image and video processor configs."""
    params = {"builder": "tiny_llava_onevision", "version": BUILDER_VERSION, "dtype": dtype, "seed": seed,
              "text": TEXT, "vision": VISION, "size": SIZE}
    return cached_build("tiny-llava-onevision", params, lambda out: _build(out, dtype, seed))


def tokens_per_frame() -> int:
    side = VISION["image_size"] // VISION["patch_size"]
    return ((side + 1) // 2) ** 2


def _build(out: Path, dtype: str, seed: int) -> None:
    import json

    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              PreTrainedTokenizerFast)

    save_tokenizer(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    eos, pad = token_id(out, "<|im_end|>"), token_id(out, "<|endoftext|>")
    config = LlavaOnevisionConfig(
        text_config=dict(TEXT, vocab_size=vocab, bos_token_id=None, eos_token_id=eos, pad_token_id=pad),
        vision_config=dict(VISION), image_token_index=token_id(out, "<|image_pad|>"),
        video_token_index=token_id(out, "<|video_pad|>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, pad, None
    torch.manual_seed(seed)
    save_peaked(LlavaOnevisionForConditionalGeneration(config), out, dtype)
    side = VISION["image_size"] // VISION["patch_size"]
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=SIZE, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=SIZE),
        tokenizer=tok, chat_template=tok.chat_template, num_image_tokens=side * side,
        vision_feature_select_strategy="full", image_token="<|image_pad|>", video_token="<|video_pad|>")
    processor.save_pretrained(out)

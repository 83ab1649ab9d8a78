"""Tiny Qwen2.5-VL checkpoint with its processor (image + video), loadable by transformers and vLLM."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .cache import cached_build
from .llm import save_peaked
from .tokenizer import save_tokenizer, token_id

BUILDER_VERSION = 1

#: language model: head_dim 32 (vLLM CPU attention), multimodal rotary sections summing to head_dim / 2
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0})
#: vision tower: one block, 14-px patches merged 2x2 into one LLM token
VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0], tokens_per_second=2)
#: pixels per image/frame: 56x56 .. 112x112, i.e. 4..16 LLM tokens per image (per 2 frames of video)
PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)


def tiny_qwen2_vl(dtype: str = "float32", seed: int = 0) -> Path:
    """Folder of a tiny Qwen2.5-VL checkpoint with tokenizer, image and video processor configs."""
    params = {"builder": "tiny_qwen2_5_vl", "version": BUILDER_VERSION, "dtype": dtype, "seed": seed,
              "text": TEXT, "vision": VISION, "pixels": PIXELS}
    return cached_build("tiny-qwen2.5-vl", params, lambda out: build_qwen2_5_vl(out, dtype, seed, TEXT, VISION, PIXELS))


def build_qwen2_5_vl(out: Path, dtype: str, seed: int, text: dict, vision: dict, pixels: dict) -> None:
    """Write a Qwen2.5-VL checkpoint (random weights, peaked logits) with the local tokenizer and an image +
    video processor into ``out``: decoder options ``text``, vision tower ``vision``, processor ``pixels``."""
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    save_tokenizer(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = {t: token_id(out, t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                         "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    text = dict(text, vocab_size=vocab, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    torch.manual_seed(seed)
    save_peaked(Qwen2_5_VLForConditionalGeneration(config), out, dtype)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok, chat_template=tok.chat_template)
    processor.save_pretrained(out)


def sample_image(seed: int = 0, size: int = 84):
    """A deterministic RGB PIL image."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def sample_video(seed: int = 0, frames: int = 4, size: int = 84) -> torch.Tensor:
    """A deterministic video as a (frames, 3, H, W) uint8 tensor with slowly changing content."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, size, size, generator=g)
    return torch.stack([(base.roll(i, dims=2) * 255).to(torch.uint8) for i in range(frames)])

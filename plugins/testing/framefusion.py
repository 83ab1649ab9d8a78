"""Video samples for FrameFusion tests, the demo and benchmarks (deterministic, no downloads)."""
from __future__ import annotations

import torch


def partly_static_video(seed: int = 0, frames: int = 8, size: int = 112, static: float = 0.5,
                        noise: float = 0.1) -> torch.Tensor:
    """(frames, 3, size, size) uint8: the left ``static`` fraction of every frame repeats frame 0 up to
    small noise (tokens there are near-duplicates across frames, as in real footage with a still
    background), the rest is fresh content each frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, size, size, generator=g)
    cut = int(round(size * static))
    out = []
    for _ in range(frames):
        f = torch.rand(3, size, size, generator=g)
        f[:, :, :cut] = (base[:, :, :cut] + noise * torch.rand(3, size, cut, generator=g)).clamp(0, 1)
        out.append((f * 255).to(torch.uint8))
    return torch.stack(out)


#: benchmark variant of the tiny Qwen2.5-VL: a deeper, wider decoder (so decoder prefill, what token
#: reduction saves, is a visible share of the time), one window-attention vision block, frames up to
#: 392x392 (14 x 14 = 196 language-model tokens per temporal patch)
BENCH_TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0})
BENCH_VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[], tokens_per_second=2)
BENCH_PIXELS = dict(min_pixels=56 * 56, max_pixels=392 * 392)


def bench_qwen2_vl(dtype: str = "float32", seed: int = 0):
    """Folder of the benchmark Qwen2.5-VL (random weights, peaked logits, local tokenizer)."""
    from .cache import cached_build
    from .vlm import build_qwen2_5_vl

    params = {"builder": "bench_qwen2_5_vl", "version": 1, "dtype": dtype, "seed": seed,
              "text": BENCH_TEXT, "vision": BENCH_VISION, "pixels": BENCH_PIXELS}
    build = lambda out: build_qwen2_5_vl(out, dtype, seed, BENCH_TEXT, BENCH_VISION, BENCH_PIXELS)  # noqa: E731
    return cached_build("bench-qwen2.5-vl", params, build)

"""overdrive.testing: offline tiny-model fixtures and helpers for tests, the demo and benchmarks.

Nothing here downloads anything: checkpoints are built from configs with seeded random weights and a
tokenizer trained locally, and cached (``$OVERDRIVE_CACHE_DIR``).
"""
from .diffusion import FAMILIES, pipeline_inputs, tiny_pipeline
from .llm import tiny_llama
from .vlm import sample_image, sample_video, tiny_qwen2_vl

__all__ = ["FAMILIES", "pipeline_inputs", "sample_image", "sample_video", "tiny_llama", "tiny_pipeline", "tiny_qwen2_vl"]

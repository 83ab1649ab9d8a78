"""Greedy answers of a checkpoint in transformers and in vLLM, each in a child process.

Child processes because registration into transformers' quantizer registry happens once per process
and vLLM spawns engine processes. Used by tests and the demo to compare engines on one checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from .probe import child_env, run_probe


def transformers_video_answer(model: Path, max_tokens: int = 6) -> dict:
    """{"prompt", "tokens", "decoder_layer", "vision_layer"} for a video question, in transformers."""
    return run_probe("overdrive.testing.hf_video_answer", str(model), str(max_tokens), env=child_env(engine=True)).result


def vllm_video_answer(model: Path, prompt: str, max_tokens: int = 6) -> list[int]:
    """Greedy tokens of vLLM for the same video question (sample_video(0))."""
    spec = {"model": str(model), "prompts": [prompt], "video": True, "max_tokens": max_tokens,
            "llm_args": {"limit_mm_per_prompt": {"video": 1, "image": 1}}}
    return run_probe("overdrive.testing.vllm_generate", spec, env=child_env(engine=True), timeout=600).result["tokens"][0]

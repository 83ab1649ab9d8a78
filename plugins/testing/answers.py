"""Greedy answers of a checkpoint in transformers and in vLLM, each in a child process.

Child processes because registration into transformers' quantizer registry happens once per process
and vLLM spawns engine processes. Used by tests and the demo to compare engines on one checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .vllm_generate import RESULT_PREFIX

_HF_VIDEO = textwrap.dedent("""
    import json, sys, torch
    import overdrive.transformers  # registers overdrive's quantizers
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from overdrive.testing import sample_video
    path, n = sys.argv[1], int(sys.argv[2])
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(text=[prompt], videos=[sample_video(0)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    lm = model.model.language_model.layers[0].mlp.down_proj
    vis = model.model.visual.blocks[0].mlp.down_proj
    print(%r + json.dumps({"prompt": prompt, "tokens": out[0, inputs.input_ids.shape[1]:].tolist(),
                           "decoder_layer": type(lm).__name__, "vision_layer": type(vis).__name__}))
""" % RESULT_PREFIX)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"HF_HUB_OFFLINE": "1"}


def _run(argv: list[str], timeout: int) -> dict:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{r.stderr[-4000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def transformers_video_answer(model: Path, max_tokens: int = 6) -> dict:
    """{"prompt", "tokens", "decoder_layer", "vision_layer"} for a video question, in transformers."""
    return _run([sys.executable, "-c", _HF_VIDEO, str(model), str(max_tokens)], 300)


def vllm_video_answer(model: Path, prompt: str, max_tokens: int = 6) -> list[int]:
    """Greedy tokens of vLLM for the same video question (sample_video(0))."""
    spec = {"model": str(model), "prompts": [prompt], "video": True, "max_tokens": max_tokens,
            "llm_args": {"limit_mm_per_prompt": {"video": 1, "image": 1}}}
    return _run([sys.executable, "-m", "overdrive.testing.vllm_generate", json.dumps(spec)], 600)["tokens"][0]

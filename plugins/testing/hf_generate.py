"""Greedy generation with transformers (overdrive's quantizers registered) in a child process.

    python -m overdrive.testing.hf_generate '{"model": DIR, "prompts": [...], "max_tokens": 8}'

emits ``{"tokens": [[...], ...], "layer": "<class of layer 0's down_proj>"}`` (:mod:`overdrive.testing.probe`).
A child process because transformers' quantizer registry is filled once per process; float32.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from .probe import child_env, emit, run_probe


def main(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import overdrive.transformers  # noqa: F401 - registers overdrive's quantizers

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    n = spec.get("max_tokens", 8)
    tokens = []
    for p in spec["prompts"]:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        tokens.append(out[0, ids.shape[1]:].tolist())
    mlp = model.model.layers[0].mlp
    return {"tokens": tokens, "layer": type(getattr(mlp, "down_proj", mlp)).__name__}


def greedy_tokens(model: Path, prompts: Sequence[str], max_tokens: int = 8, timeout: int = 600) -> dict:
    """Run :func:`main` in a child process; its result."""
    spec = {"model": str(model), "prompts": list(prompts), "max_tokens": max_tokens}
    return run_probe("overdrive.testing.hf_generate", spec, env=child_env(engine=True), timeout=timeout).result


if __name__ == "__main__":
    emit(main(json.loads(sys.argv[1])))

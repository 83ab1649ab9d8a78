"""Greedy generation with ``vllm.LLM`` in a child process, for comparisons with transformers.

    python -m overdrive.testing.vllm_generate '{"model": DIR, "prompts": [...], "max_tokens": 8,
                                               "video": false, "llm_args": {...}}'

emits ``{"tokens": [[...], ...], "prompt_lens": [...]}`` (:func:`overdrive.testing.probe.emit`; read it
with :func:`overdrive.testing.probe.run_probe`). With ``"video": true`` (or ``"sample"``, or
``"partly_static"``, with an optional ``"video_frames"``) each prompt gets a fixture video seeded by its
index (:func:`video_item`). vLLM spawns engine processes, hence the ``__main__`` guard and the separate process.
"""
from __future__ import annotations

import json
import os
import sys

from .probe import emit


def video_item(seed: int, kind: str = "sample", frames: int | None = None):
    """vLLM's (frames, metadata) video input from a fixture video: ``sample`` (:func:`overdrive.testing.vlm.sample_video`)
    or ``partly_static`` (:func:`overdrive.testing.framefusion.partly_static_video`)."""
    from .framefusion import partly_static_video
    from .vlm import sample_video

    make = {"sample": sample_video, "partly_static": partly_static_video}[kind]
    vid = make(seed, **({"frames": frames} if frames else {})).permute(0, 2, 3, 1).numpy()  # (frames, H, W, 3)
    n = vid.shape[0]
    meta = {"fps": 2.0, "duration": n / 2.0, "total_num_frames": n, "frames_indices": list(range(n)),
            "video_backend": "opencv", "do_sample_frames": False}
    return vid, meta


def main(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **{"dtype": "float32", "max_model_len": 1024, "enforce_eager": True,
                                      **spec.get("llm_args", {})})
    requests = []
    for i, prompt in enumerate(spec["prompts"]):
        req: dict = {"prompt": prompt}
        if spec.get("video"):
            kind = spec["video"] if isinstance(spec["video"], str) else "sample"
            req["multi_modal_data"] = {"video": video_item(i, kind, spec.get("video_frames"))}
        requests.append(req)
    outs = llm.generate(requests, SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0,
                                                 ignore_eos=True))
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_lens": [len(o.prompt_token_ids) for o in outs]}


if __name__ == "__main__":
    emit(main(json.loads(sys.argv[1])))

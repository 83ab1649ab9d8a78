"""Greedy generation with ``vllm.LLM`` in a child process, for comparisons with transformers.

    python -m overdrive.testing.vllm_generate '{"model": DIR, "prompts": [...], "max_tokens": 8,
                                               "video": false, "llm_args": {...}}'

prints one line ``OVERDRIVE_RESULT {"tokens": [[...], ...], "prompt_lens": [...]}`` (engine logs may follow). With ``"video": true`` each
prompt gets :func:`overdrive.testing.vlm.sample_video` (seeded by its index) as its video.
vLLM spawns engine processes, hence the ``__main__`` guard and the separate process.
"""
from __future__ import annotations

import json
import os
import sys


RESULT_PREFIX = "OVERDRIVE_RESULT "


def video_item(seed: int):
    from .vlm import sample_video

    vid = sample_video(seed).permute(0, 2, 3, 1).numpy()  # (frames, H, W, 3)
    n = vid.shape[0]
    meta = {"fps": 2.0, "duration": n / 2.0, "total_num_frames": n, "frames_indices": list(range(n)),
            "video_backend": "opencv", "do_sample_frames": False}
    return vid, meta


def main(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype="float32", max_model_len=1024, enforce_eager=True,
              **spec.get("llm_args", {}))
    requests = []
    for i, prompt in enumerate(spec["prompts"]):
        req: dict = {"prompt": prompt}
        if spec.get("video"):
            req["multi_modal_data"] = {"video": video_item(i)}
        requests.append(req)
    outs = llm.generate(requests, SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0,
                                                 ignore_eos=True))
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_lens": [len(o.prompt_token_ids) for o in outs]}


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(main(json.loads(sys.argv[1]))), flush=True)

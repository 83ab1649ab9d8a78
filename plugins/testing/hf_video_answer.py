"""Greedy answer of a (possibly overdrive-quantized) VLM checkpoint to a video question, in transformers.

    python -m overdrive.testing.hf_video_answer MODEL_DIR MAX_TOKENS

emits ``{"prompt", "tokens", "decoder_layer", "vision_layer"}``. A fresh process, because overdrive's
quantizers register into transformers' process-global registry.
"""
from __future__ import annotations

import sys


def main(path: str, n: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import overdrive.transformers  # noqa: F401  (registers overdrive's quantizers)
    from overdrive.testing import sample_video

    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(text=[prompt], videos=[sample_video(0)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    lm = model.model.language_model.layers[0].mlp.down_proj
    vis = model.model.visual.blocks[0].mlp.down_proj
    return {"prompt": prompt, "tokens": out[0, inputs.input_ids.shape[1]:].tolist(),
            "decoder_layer": type(lm).__name__, "vision_layer": type(vis).__name__}


if __name__ == "__main__":
    from overdrive.testing.probe import emit

    emit(main(sys.argv[1], int(sys.argv[2])))

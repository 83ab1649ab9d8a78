"""Calibration data for MBQ: image-text pairs -> model inputs with vision and caption masks.

Records are ``{"image": PIL image | path | None, "prompt": str, "answer": str}``. A jsonl file holds
one record per line (``image`` a path relative to the file, or null). With no data, a small built-in
sample (synthetic images with short captions) is used so the command works out of the box; real
calibration should use real image-caption pairs (the paper uses 128 COCO captions).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from overdrive.config import ConfigError

from .calibrate import CalibSample

BUILTIN = [
    ("describe the image.", "a red square on a dark blue background"),
    ("what happens in this image?", "a cat sits on a mat near the window"),
    ("describe the picture in one sentence.", "two birds fly over a green field"),
    ("what is shown here?", "a small boat on a calm lake at sunset"),
    ("what do you see?", "a bowl of fruit on a wooden table"),
    ("describe the scene.", "a person walks a dog along a quiet street"),
    ("what is in the image?", "a yellow flower in a glass vase"),
    ("summarise the image.", "a train crosses a bridge over a river"),
]


def builtin_records(with_images: bool) -> list[dict[str, Any]]:
    from overdrive.testing.vlm import sample_image

    return [{"image": sample_image(seed=i) if with_images else None, "prompt": p, "answer": a}
            for i, (p, a) in enumerate(BUILTIN)]


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: calibration data file not found")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
            raise ConfigError(f"{path}:{n}: expected an object with string 'prompt' and 'answer' (and optional 'image')")
        img = rec.get("image")
        if img is not None:
            p = (path.parent / img) if not Path(img).is_absolute() else Path(img)
            if not p.is_file():
                raise ConfigError(f"{path}:{n}: image {p} not found")
            img = Image.open(p).convert("RGB")
        out.append({"image": img, "prompt": rec["prompt"], "answer": rec["answer"]})
    if not out:
        raise ConfigError(f"{path}: no records")
    return out


def build_samples(processor: Any, records: Sequence[dict[str, Any]], vision_token_ids: Sequence[int]) -> list[CalibSample]:
    """Tokenise records with the model's chat template; masks: vision placeholders, answer tokens."""
    samples = []
    has_images = hasattr(processor, "image_processor")
    for rec in records:
        user: list[dict[str, Any]] = [{"type": "text", "text": rec["prompt"]}]
        if rec["image"] is not None:
            if not has_images:
                raise ConfigError("calibration data has images but the model has no image processor")
            user.insert(0, {"type": "image"})
        msgs = [{"role": "user", "content": user}]
        full_msgs = msgs + [{"role": "assistant", "content": [{"type": "text", "text": rec["answer"]}]}]
        prefix = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(full_msgs, tokenize=False)
        if not full.startswith(prefix):
            raise ConfigError("the chat template does not render the answer after the generation prompt")
        kw = {"images": [rec["image"]]} if rec["image"] is not None else {}
        inputs = dict(processor(text=[full], return_tensors="pt", **kw))
        n_prefix = processor(text=[prefix], return_tensors="pt", **kw)["input_ids"].shape[1]
        ids = inputs["input_ids"][0]
        caption = torch.zeros(ids.numel(), dtype=torch.bool)
        caption[n_prefix:] = True
        vision = torch.isin(ids, torch.tensor(list(vision_token_ids), dtype=ids.dtype))
        inputs.pop("token_type_ids", None)
        samples.append(CalibSample(inputs, vision, caption & ~vision))
    return samples

"""Calibration data for MBQ: image-text pairs or plain text -> model inputs with vision and caption masks.

Two kinds of record:

* pairs ``{"image": PIL image | path | None, "prompt": str, "answer": str}``, rendered with the model's
  chat template (vision placeholders -> vision mask; the answer -> caption mask). The paper calibrates
  on 128 COCO captions.
* text ``{"text": str}`` (or plain ``.txt`` files), for plain LLMs as AWQ calibrates: the texts are
  tokenized, concatenated (EOS between documents) and cut into ``seq_len``-token chunks; every token
  is a caption token (MBQ on text alone is AWQ: there is no modality to balance).

A jsonl file holds one record per line (``image`` a path relative to the file, or null); a ``.txt``
file, or a folder of them, is text. With no data, a small built-in sample (deterministic synthetic noise
images with short captions, :func:`synthetic_image`) is used so the command works out of the box.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from overdrive.config import ConfigError


@dataclasses.dataclass
class CalibSample:
    """One calibration sample: model inputs and its modality masks (bool, one entry per token)."""

    inputs: dict[str, torch.Tensor]
    vision_mask: torch.Tensor
    caption_mask: torch.Tensor

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


def synthetic_image(seed: int = 0, size: int = 84) -> Any:
    """A deterministic RGB PIL image (uniform noise from a seeded generator): the built-in records' images.
    They only give the vision tower tokens to produce; real MBQ calibration passes --calib-data."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


def builtin_records(with_images: bool) -> list[dict[str, Any]]:
    return [{"image": synthetic_image(seed=i) if with_images else None, "prompt": p, "answer": a}
            for i, (p, a) in enumerate(BUILTIN)]


def load_records(path: Path) -> list[dict[str, Any]]:
    """Records from a jsonl file (pairs and/or ``{"text"}``), a ``.txt`` file or a folder of ``.txt`` files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ConfigError(f"{path}: folder has no *.txt calibration files")
        return [{"text": f.read_text(errors="replace")} for f in files]
    if not path.is_file():
        raise ConfigError(f"{path}: calibration data file not found")
    if path.suffix == ".txt":
        return [{"text": path.read_text(errors="replace")}]
    return load_jsonl(path)


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: calibration data file not found")
    out: list[dict[str, Any]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from None
        if isinstance(rec, dict) and set(rec) == {"text"}:
            if not isinstance(rec["text"], str):
                raise ConfigError(f"{path}:{n}: 'text' must be a string, got {type(rec['text']).__name__}")
            out.append({"text": rec["text"]})
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
            raise ConfigError(f"{path}:{n}: expected an object with a string 'text', or string 'prompt' and 'answer' "
                              "(and optional 'image')")
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


def text_samples(tokenizer: Any, texts: Sequence[str], n_samples: int, seq_len: int, batch: int = 8,
                 source: str = "calibration text") -> list[CalibSample]:
    """``n_samples`` chunks of ``seq_len`` tokens from ``texts`` (concatenated, EOS between documents).

    Chunks are grouped ``batch`` at a time into one sample (input_ids ``(B, seq_len)``); masks have
    the same shape: no vision token, every token a caption token. Fewer chunks than asked is allowed
    when the text is short (all full chunks are used); less than one chunk is an error.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise ConfigError(f"--samples and --seq-len must be positive, got {n_samples} and {seq_len}")
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    eos = tok.eos_token_id
    ids: list[int] = []
    need = n_samples * seq_len
    for t in texts:
        if len(ids) >= need:
            break
        if not t.strip():
            continue
        ids.extend(tok(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    n = min(n_samples, len(ids) // seq_len)
    if n == 0:
        raise ConfigError(f"{source}: {len(ids)} tokens, fewer than one --seq-len chunk of {seq_len}; give more "
                          "text or a smaller --seq-len")
    chunks = torch.tensor(ids[:n * seq_len], dtype=torch.long).reshape(n, seq_len)
    out = []
    for b in chunks.split(batch):
        out.append(CalibSample({"input_ids": b, "attention_mask": torch.ones_like(b)},
                               torch.zeros(b.shape, dtype=torch.bool), torch.ones(b.shape, dtype=torch.bool)))
    return out


def build_calibration(processor: Any, records: Sequence[dict[str, Any]], vision_token_ids: Sequence[int], *,
                      n_samples: int = 128, seq_len: int = 512) -> list[CalibSample]:
    """Samples from mixed records: pairs through the chat template (at most ``n_samples`` of them),
    text records chunked to ``seq_len`` (at most ``n_samples`` chunks)."""
    pairs = [r for r in records if "text" not in r][:n_samples]
    texts = [r["text"] for r in records if "text" in r]
    out = build_samples(processor, pairs, vision_token_ids) if pairs else []
    if texts:
        out += text_samples(processor, texts, n_samples, seq_len)
    return out


def _chat_text(processor: Any, rec: dict[str, Any]) -> tuple[str, str]:
    """(prompt rendered up to the generation prompt, full text with the answer).

    Multimodal templates take ``content`` as a list of parts; many plain-LLM templates (ChatML ones
    among them) only take a string. Try parts, then string content (text-only records), then no
    template at all ("prompt\n" + answer) when the model has none or it refuses both.
    """
    parts: list[dict[str, Any]] = [{"type": "text", "text": rec["prompt"]}]
    if rec["image"] is not None:
        parts.insert(0, {"type": "image"})
    forms = [(parts, [{"type": "text", "text": rec["answer"]}])]
    if rec["image"] is None:
        forms.append((rec["prompt"], rec["answer"]))
    errors = []
    for user, answer in forms:
        msgs = [{"role": "user", "content": user}]
        try:
            prefix = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            full = processor.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template refusing a content form (TypeError, jinja errors, ...)
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if not isinstance(prefix, str) or rec["prompt"] not in prefix:
            errors.append("the rendered prompt does not contain the prompt text")
            continue
        if not full.startswith(prefix):
            errors.append("the chat template does not render the answer after the generation prompt")
            continue
        return prefix, full
    if rec["image"] is not None:
        raise ConfigError("the chat template cannot render an image-text calibration record ("
                          + "; ".join(errors) + ")")
    prefix = rec["prompt"] + "\n"
    return prefix, prefix + rec["answer"]


def build_samples(processor: Any, records: Sequence[dict[str, Any]], vision_token_ids: Sequence[int]) -> list[CalibSample]:
    """Tokenise pair records with the model's chat template; masks: vision placeholders, answer tokens."""
    samples = []
    has_images = hasattr(processor, "image_processor")
    for rec in records:
        if rec["image"] is not None and not has_images:
            raise ConfigError("calibration data has images but the model has no image processor")
        prefix, full = _chat_text(processor, rec)
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

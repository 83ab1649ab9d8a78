"""A byte-level BPE tokenizer trained locally (deterministically) with the `tokenizers` library.

It carries the ChatML-style special tokens and the Qwen2-VL vision tokens, so the same tokenizer
serves the tiny LLM and the tiny VLM, and a chat template that renders text, image and video
content items the way Qwen2-VL processors expect.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small fixed corpus: enough for a few hundred merges, and the words the tests and demo use.
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny model built for tests",
    "overdrive makes efficient inference methods run inside vllm sglang diffusers and transformers",
    "describe the video. what happens in this image? a cat sits on a red mat near the window",
    "quantization of weights and activations, key value cache, attention, tokens, frames, pixels",
    "one two three four five six seven eight nine ten eleven twelve",
    "the model answers questions about pictures and videos in short sentences",
] * 8


def save_tokenizer(out: Path, vocab_size: int = 512) -> None:
    """Train and save tokenizer.json + tokenizer_config.json (+ chat template) into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def token_id(out: Path, token: str) -> int:
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    added = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    return added.get(token, vocab.get(token))

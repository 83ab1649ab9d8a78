"""Malformed OpenAI-API requests that a vLLM-compatible server must answer with a 4xx and survive.

Used by the routing server's tests and by load benchmarks that mix bad requests into the traffic: each
entry is sent as raw bytes, so invalid JSON is expressible. The set follows what vLLM 0.32's own OpenAI
server refuses (its request models, ``SamplingParams`` checks, renderer and input-processor checks):

    for bad in malformed_requests("r2r", max_model_len=512, vocab_size=500):
        status, body = post_raw(url + bad.path, bad.body)   # bad.status: the expected status
"""
from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any


@dataclasses.dataclass(frozen=True)
class BadRequest:
    name: str
    path: str
    body: bytes
    status: int = 400  # what vLLM's server answers


def malformed_requests(model: str, max_model_len: int, vocab_size: int) -> list[BadRequest]:
    """The set for a server serving ``model`` with context ``max_model_len``; a prompt token id at or above
    ``vocab_size`` must be out of that server's vocabulary."""
    cmpl, chat = "/v1/completions", "/v1/chat/completions"

    def c(name: str, status: int = 400, path: str = cmpl, **fields: Any) -> BadRequest:
        return BadRequest(name, path, json.dumps({"model": model, **fields}).encode(), status)

    return [
        c("max_tokens far above the context", prompt="hello world", max_tokens=10**9),
        c("prompt longer than max_model_len", prompt=[5] * (max_model_len + 10), max_tokens=4),
        c("prompt exactly max_model_len (no room for an output token)", prompt=[5] * max_model_len, max_tokens=1),
        c("prompt token id just outside the vocabulary", prompt=[5, vocab_size + 3], max_tokens=4),
        c("prompt token id far outside the vocabulary", prompt=[10**9], max_tokens=4),
        c("negative prompt token id", prompt=[5, -1], max_tokens=4),
        c("empty prompt", prompt="", max_tokens=4),
        c("negative temperature", prompt="hello", temperature=-1.0),
        c("top_p above 1", prompt="hello", top_p=1.5),
        c("top_k below -1", prompt="hello", top_k=-5),
        c("n = 0", prompt="hello", n=0),
        c("negative logprobs", prompt="hello", logprobs=-5),
        c("negative max_tokens", prompt="hello", max_tokens=-1),
        c("max_tokens of the wrong type", prompt="hello", max_tokens="ten"),
        c("stop of the wrong type", prompt="hello", stop=5),
        c("stream_options without stream", prompt="hello", stream_options={"include_usage": True}),
        BadRequest("unknown model", cmpl, json.dumps({"model": model + "-no-such-model", "prompt": "hello"}).encode(),
                   404),
        BadRequest("invalid JSON", cmpl, b'{"model": "' + model.encode() + b'", "prompt": '),
        BadRequest("body not an object", cmpl, b"[1, 2, 3]"),
        c("chat without messages", path=chat, max_tokens=4),
        c("chat max_completion_tokens far above the context", path=chat, max_completion_tokens=10**9,
          messages=[{"role": "user", "content": "hello"}]),
    ]


def post_raw(url: str, body: bytes, timeout: float = 300) -> tuple[int, Any]:
    """POST ``body`` as JSON content; (status, decoded JSON answer, or the raw text if it is not JSON)."""
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")

"""Request validation of a token-routing server: every malformed request is refused here, before any engine.

Mirrors what vLLM 0.32's own OpenAI server does (docs/ledger.md lists the symbols used):

* the body is parsed with vLLM's own request models (``CompletionRequest`` / ``ChatCompletionRequest``,
  pydantic): wrong types, a negative prompt token id, an empty prompt, ``stream_options`` without
  ``stream``, a negative ``logprobs``... are a 400 as in vLLM;
* the served model name is checked next (404, as vLLM);
* what the routing loop does not implement is refused by name (400): ``n`` or ``best_of`` above 1,
  several prompts, and every other vLLM field the client set to a non-default value (logprobs,
  penalties, beam search, structured outputs, tools...), rather than silently ignored;
* the prompt is rendered (chat template, or tokenized with truncation at ``max_model_len + 1`` tokens,
  as vLLM's renderer bounds the work) and checked like vLLM's renderer and input processor: not empty,
  every token id within the vocabulary, no longer than ``max_model_len``, and not *equal* to it (no room
  for one output token);
* ``max_tokens`` (or chat's ``max_completion_tokens``) follows vLLM's rule: above ``max_model_len`` or
  below 1 is a 400, otherwise it is clamped to the context left, ``max_model_len - prompt length``
  (``vllm.entrypoints.serve.utils.api_utils.get_max_tokens``); the routing loop never grows a session
  past ``max_model_len`` (an engine asserts on that and dies);
* the sampling parameters are checked by building vLLM's ``SamplingParams`` from the request
  (temperature in [0, 2], top_p in (0, 1], top_k >= -1, n >= 1, ...): its errors are a 400 naming the
  parameter; ``stop_token_ids`` must lie within the vocabulary (as vLLM checks them).

Token ids must index *both* engines' embedding tables and the router's embedding table (the small
model's), so the vocabulary bound is the smaller of the two models' vocabulary sizes; vLLM accepts an
id up to the larger of the tokenizer's and the model's sizes.

Every refusal is a :class:`RequestError`, whose :meth:`~RequestError.body` has vLLM's error shape
(``ErrorResponse``): ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .engines import Sampling

#: request fields the routing loop implements (everything else must be left at vLLM's default)
SUPPORTED = frozenset({"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "stream",
                       "stream_options", "stop", "stop_token_ids", "seed", "temperature", "top_p", "top_k",
                       "ignore_eos", "add_special_tokens", "add_generation_prompt"})
#: fields that do not change the output and are accepted whatever their value
IGNORED = frozenset({"user", "request_id", "session_id", "cache_salt", "return_token_ids"})
#: this server's own request fields (popped before vLLM's models see the body)
EXTENSIONS = ("router_threshold", "return_router_scores", "best_of")


class RequestError(Exception):
    """A request refused with an HTTP status and vLLM's error body."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.err_type, self.param = message, status, err_type, param

    def body(self) -> dict:
        return error_body(self.message, self.status, self.err_type, self.param)


def error_body(message: str, status: int, err_type: str, param: str | None = None) -> dict:
    """vLLM's ``ErrorResponse`` as JSON."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request is checked against: the served name and the two engines' common limits."""

    model_name: str
    max_model_len: int  # the smaller of the two engines' max_model_len
    vocab_size: int  # the smaller of the two models' vocabulary sizes


@dataclasses.dataclass
class Validated:
    prompt: list[int]
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool


def validate(body: Any, chat: bool, tokenizer: Any, limits: Limits) -> Validated:
    """The request's prompt ids and sampling settings, or :class:`RequestError` (see the module docstring)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    body = dict(body)
    ext = {k: body.pop(k) for k in EXTENSIONS if k in body}
    req = _parse(body, chat)
    if req.model is not None and req.model != limits.model_name:
        raise RequestError(f"The model `{req.model}` does not exist. Valid aliases: {limits.model_name}.",
                           404, "NotFoundError", "model")
    _check_supported(req, ext)
    threshold = ext.get("router_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0):
        raise RequestError(f"`router_threshold` must be a number within [0, 1], got {threshold!r}",
                           param="router_threshold")
    scores = ext.get("return_router_scores", False)
    if not isinstance(scores, bool):
        raise RequestError(f"`return_router_scores` must be a boolean, got {scores!r}", param="return_router_scores")

    prompt = _render(req, chat, tokenizer, limits)
    check_prompt(prompt, limits)
    max_param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    max_tokens = output_budget(vars(req)[max_param], len(prompt), limits.max_model_len, max_param)  # no deprecation warning
    sp = _sampling_params(req, max_tokens)
    bad = [i for i in sp.stop_token_ids or () if not 0 <= i < limits.vocab_size]
    if bad:
        raise RequestError(f"stop_token_ids {bad} are outside the vocabulary [0, {limits.vocab_size})",
                           param="stop_token_ids")
    stop = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
    sampling = Sampling(max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                        seed=sp.seed, ignore_eos=sp.ignore_eos, stop_token_ids=tuple(sp.stop_token_ids or ()),
                        threshold=None if threshold is None else float(threshold), return_scores=scores)
    opts = req.stream_options
    return Validated(prompt, sampling, stop, bool(req.stream), bool(opts is not None and opts.include_usage))


def check_prompt(prompt: list[int], limits: Limits) -> None:
    """vLLM's renderer and input-processor checks of a prompt's token ids."""
    n, max_len = len(prompt), limits.max_model_len
    if n == 0:
        raise RequestError("The decoder prompt cannot be empty", param="prompt")
    lo, hi = min(prompt), max(prompt)
    if lo < 0 or hi >= limits.vocab_size:
        raise RequestError(f"Token id {lo if lo < 0 else hi} is out of vocabulary (the two models share "
                           f"[0, {limits.vocab_size}))", param="prompt")
    if n > max_len:
        raise RequestError(f"This model's maximum context length is {max_len} tokens. However, your prompt "
                           f"contains {'at least ' if n == max_len + 1 else ''}{n} input tokens, which exceeds this "
                           f"limit even without any output tokens. Please reduce the length of the input prompt.",
                           param="input_tokens")
    if n == max_len:
        raise RequestError(f"The decoder prompt (length {n}) plus the number of requested output tokens (at least 1) "
                           f"is longer than the maximum model length of {max_len}.", param="input_tokens")


def output_budget(requested: int | None, prompt_len: int, max_model_len: int, param: str = "max_tokens") -> int:
    """vLLM 0.32's rule for the number of tokens to generate: a request above ``max_model_len`` or below 1
    is refused, otherwise ``min(requested, max_model_len - prompt_len)`` (the whole context left when
    unset). ``prompt_len`` < ``max_model_len`` (:func:`check_prompt`)."""
    if requested is not None and requested > max_model_len:
        raise RequestError(f"{param}={requested} cannot be greater than max_model_len={max_model_len}. "
                           f"Please request fewer output tokens.", param=param)
    if requested is not None and requested < 1:
        raise RequestError(f"{param} must be at least 1, got {requested}.", param=param)
    left = max_model_len - prompt_len
    return left if requested is None else min(requested, left)


# ------------------------------------------------------------------------------------------ helpers
def _parse(body: dict, chat: bool) -> Any:
    import pydantic
    from vllm.exceptions import VLLMClientError

    if chat:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as Model
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as Model
    try:
        return Model.model_validate(body)
    except pydantic.ValidationError as e:
        raise RequestError(*_describe(e)) from None
    except (VLLMClientError, ValueError, TypeError) as e:  # a vLLM validator's own error, not wrapped by pydantic
        raise RequestError(str(e), param=getattr(e, "parameter", None)) from None


def _describe(e: Any) -> tuple[str, int, str, str | None]:
    """(message, status, type, param) of a pydantic error, naming the field as vLLM's handler does."""
    errors = e.errors()
    param = None
    for err in errors:
        ctx = (err.get("ctx") or {}).get("error")
        if getattr(ctx, "parameter", None):
            param = ctx.parameter
            break
    if param is None and errors:
        loc = [str(p) for p in errors[0].get("loc", ()) if not any(c in str(p) for c in "[]()")]
        param = ".".join(loc) or None
    lines = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if not any(c in str(p) for c in "[]()"))
        lines.append(f"{where or 'body'}: {err.get('msg')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}: " + "; ".join(lines) + more, \
        400, "BadRequestError", param


def _check_supported(req: Any, ext: dict) -> None:
    if req.n not in (None, 1):
        if isinstance(req.n, int) and req.n < 1:
            raise RequestError(f"n must be at least 1, got {req.n}.", param="n")
        raise RequestError(f"n={req.n}: the routing server returns one completion per request (n = 1)", param="n")
    best_of = ext.get("best_of")
    if best_of not in (None, 1):
        raise RequestError(f"best_of={best_of!r}: the routing server returns one completion per request",
                           param="best_of")
    fields = type(req).model_fields
    neutral = getattr(req, "_DEFAULT_SAMPLING_PARAMS", None) or {}  # e.g. presence_penalty 0.0: what unset means
    for name in sorted(req.model_fields_set - SUPPORTED - IGNORED):
        field = fields.get(name)
        if field is None:
            continue
        value = getattr(req, name)
        if value != field.get_default(call_default_factory=True) and not (name in neutral and value == neutral[name]):
            raise RequestError(f"`{name}` is not supported by the routing server (leave it unset)", param=name)


def _render(req: Any, chat: bool, tok: Any, limits: Limits) -> list[int]:
    if chat:
        messages = [m if isinstance(m, dict) else dict(m) for m in req.messages]
        if not messages:
            raise RequestError("`messages` must not be empty", param="messages")
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, tokenize=True)
        except Exception as e:  # noqa: BLE001 - a template that cannot render these messages (jinja, missing keys)
            raise RequestError(f"the chat template cannot render these messages: {type(e).__name__}: {e}",
                               param="messages") from None
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    p = req.prompt
    if isinstance(p, list) and p and not isinstance(p[0], int):  # list[str] or list[list[int]]
        if len(p) != 1:
            raise RequestError(f"{len(p)} prompts in one request: the routing server takes one prompt per request",
                               param="prompt")
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise RequestError("The decoder prompt cannot be empty", param="prompt")
        # bounded like vLLM's renderer: one token more than fits is enough to refuse
        return list(tok(p, add_special_tokens=req.add_special_tokens, truncation=True,
                        max_length=limits.max_model_len + 1).input_ids)
    return list(p or [])


def _sampling_params(req: Any, max_tokens: int) -> Any:
    """vLLM's own ``SamplingParams`` for the request: its checks are vLLM's parameter validation."""
    from vllm.exceptions import VLLMClientError

    try:
        return req.to_sampling_params(max_tokens, {})
    except (VLLMClientError, ValueError, TypeError, OverflowError) as e:
        raise RequestError(str(e), param=getattr(e, "parameter", None)) from None

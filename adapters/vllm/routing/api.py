"""The OpenAI-compatible HTTP app of a token-routing server (FastAPI).

``/v1/completions`` and ``/v1/chat/completions`` (streaming or not, ``n`` = 1), ``/v1/models``,
``/health``, ``/r2r/stats``. Extensions: request field ``router_threshold``; response
``choices[0].token_ids`` and ``choices[0].routed`` (per-token flags), and with
``return_router_scores: true`` ``choices[0].router_scores`` (the router logit per token, non-streaming);
``usage.routed_tokens`` and ``usage.small_tokens``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request  # module level: FastAPI resolves handler annotations from module globals

from overdrive.contracts.token_routing import RoutedSequence

from .engines import RoutingEngines, Sampling


# --------------------------------------------------------------------------------------------- HTTP
class BadRequest(ValueError):
    pass


def parse_sampling(body: dict) -> Sampling:
    def num(name: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
        v = body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bound = f">= {lo}" if hi is None else f"within [{lo}, {hi}]"
            raise BadRequest(f"'{name}' must be {bound}, got {v!r}")
        return kind(v)

    if body.get("n", 1) != 1 or body.get("best_of", 1) not in (None, 1):
        raise BadRequest("only n = 1 (and best_of = 1) is supported")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "response_format"):
        if body.get(name) not in (None, False):
            raise BadRequest(f"'{name}' is not supported by the routing server")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise BadRequest("'stop_token_ids' must be a list of integers")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Sampling(max_tokens=num(max_name, 16, int, 1), temperature=num("temperature", 1.0, float, 0.0, 2.0),
                    top_p=num("top_p", 1.0, float, 0.0, 1.0), top_k=num("top_k", 0, int, -1), seed=seed,
                    ignore_eos=bool(body.get("ignore_eos", False)), stop_token_ids=tuple(stop_ids),
                    threshold=num("router_threshold", None, float, 0.0, 1.0),
                    return_scores=bool(body.get("return_router_scores", False)))


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of them")
    return stop


class TextStream:
    """Incremental detokenization with stop strings: :meth:`push` returns the text that is final."""

    def __init__(self, tok: Any, stop: list[str]) -> None:
        self.tok, self.stop = tok, stop
        self.tokens: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False
        self.text = ""

    def push(self, token: int, final: bool) -> str:
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            i = text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                text, self.stopped, final = text[:i], True, True
        self.text = text
        end = len(text) if final else len(text) - self.hold
        if not final and text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta


def build_app(model_name: str, lifespan: Any = None) -> Any:
    """The FastAPI app; its handlers use ``app.state.engines`` (a :class:`RoutingEngines`) and
    ``app.state.tokenizer``, set by ``lifespan`` (or by the caller) before requests arrive."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title=f"overdrive {model_name} routing server", lifespan=lifespan)
    created = int(time.time())

    def error(status: int, message: str) -> Any:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                            status_code=status)

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "overdrive"}]}

    @app.get("/r2r/stats")
    async def stats(request: Request) -> Any:
        engines = request.app.state.engines
        t = engines.totals
        return {**t, "routed_fraction": t["routed_tokens"] / t["tokens"] if t["tokens"] else 0.0,
                "threshold": engines.threshold, "router_batches": engines.batcher.calls,
                "router_rows": engines.batcher.rows}

    def prompt_ids(tok: Any, body: dict, chat: bool) -> list[int]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise BadRequest("'messages' must be a non-empty list")
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return list(ids)
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            ids = tok(p, add_special_tokens=True).input_ids
        elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            ids = p
        else:
            raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")
        if not ids:
            raise BadRequest("the prompt has no tokens")
        vocab = len(tok)
        if any(i < 0 or i >= vocab for i in ids):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})")
        return list(ids)

    async def handle(request: Request, chat: bool) -> Any:
        engines, tok = request.app.state.engines, request.app.state.tokenizer
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            return error(400, f"the body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        if body.get("model") not in (None, model_name):
            return error(404, f"model {body.get('model')!r} does not exist; this server serves {model_name!r}")
        try:
            ids = prompt_ids(tok, body, chat)
            sp = parse_sampling(body)
            stop = parse_stop(body)
        except BadRequest as e:
            return error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            return StreamingResponse(stream(engines, tok, rid, ids, sp, stop, chat, bool(opts.get("include_usage"))),
                                     media_type="text/event-stream")
        text = TextStream(tok, stop)
        tokens, routed, scores = [], [], []
        seqs: list[RoutedSequence] = []
        gen = engines.generate(ids, sp, seqs)
        try:
            async for ev in gen:
                tokens.append(ev.token)
                routed.append(ev.routed)
                scores.append(ev.score)
                text.push(ev.token, final=seqs[0].finished)
                if text.stopped:
                    break
        finally:
            await gen.aclose()
        finish = "stop" if text.stopped else (seqs[0].finish_reason or "length")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": tokens, "routed": routed}
        if sp.return_scores:
            choice["router_scores"] = scores
        if chat:
            choice["message"] = {"role": "assistant", "content": text.text}
        else:
            choice.update(text=text.text, logprobs=None)
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice],
                "usage": usage(len(ids), tokens, routed)}

    def usage(n_prompt: int, tokens: list[int], routed: list[bool]) -> dict:
        r = sum(routed)
        return {"prompt_tokens": n_prompt, "completion_tokens": len(tokens), "total_tokens": n_prompt + len(tokens),
                "routed_tokens": r, "small_tokens": len(tokens) - r}

    async def stream(engines: RoutingEngines, tok: Any, rid: str, ids: list[int], sp: Sampling, stop: list[str],
                     chat: bool, include_usage: bool) -> AsyncIterator[str]:
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        text = TextStream(tok, stop)
        tokens, routed = [], []
        seqs: list[RoutedSequence] = []

        def chunk(delta: str, new_ids: list[int], new_routed: list[bool], finish: str | None) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": new_ids, "routed": new_routed}
            if chat:
                c["delta"] = {"content": delta} if delta or finish is None else {}
            else:
                c.update(text=delta, logprobs=None)
            return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": int(time.time()),
                                          "model": model_name, "choices": [c]}) + "\n\n"

        if chat:
            yield "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                                         "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                      "finish_reason": None}]}) + "\n\n"
        gen = engines.generate(ids, sp, seqs)
        try:
            async for ev in gen:
                tokens.append(ev.token)
                routed.append(ev.routed)
                delta = text.push(ev.token, final=seqs[0].finished)
                done = seqs[0].finished or text.stopped
                if done:
                    finish = "stop" if text.stopped else (seqs[0].finish_reason or "length")
                    yield chunk(delta, [ev.token], [ev.routed], finish)
                    break
                yield chunk(delta, [ev.token], [ev.routed], None)
        finally:
            await gen.aclose()
        if include_usage:
            yield "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                                         "choices": [], "usage": usage(len(ids), tokens, routed)}) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app

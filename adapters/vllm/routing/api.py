"""The OpenAI-compatible HTTP app of a token-routing server (FastAPI).

``/v1/completions`` and ``/v1/chat/completions`` (streaming or not, ``n`` = 1), ``/v1/models``,
``/health`` (503 once an engine is dead), ``/{method}/stats`` (e.g. ``/r2r/stats``). Extensions: request
field ``router_threshold``; response ``choices[0].token_ids`` and ``choices[0].routed`` (per-token
flags), and with ``return_router_scores: true`` ``choices[0].router_scores`` (the router logit per
token, non-streaming); ``usage.routed_tokens`` and ``usage.small_tokens``.

Errors have vLLM's body shape, ``{"error": {"message", "type", "param", "code"}}``: a malformed request
is a 4xx from :mod:`.validation` before anything reaches an engine; an engine error fails only the
requests it touched (500; 503 when the engine died), a streamed one with an error event and ``[DONE]``.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request  # module level: FastAPI resolves handler annotations from module globals

from overdrive.contracts.token_routing import RoutedSequence

from .engines import RoutingEngines
from .validation import RequestError, Validated, error_body, validate

log = logging.getLogger("overdrive.routing")


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



def engine_error(e: BaseException) -> tuple[int, dict]:
    """(status, vLLM error body) for an error raised while a request ran on the engines: 500, or 503 once an
    engine is dead (the request may be retried on a restarted server)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, EngineDeadError):
        return 503, error_body("an engine of this server died; the server is shutting down",
                               503, "ServiceUnavailableError")
    return 500, error_body(f"the request failed on an engine: {type(e).__name__}: {e}", 500, "InternalServerError")


def build_app(method: str, model_name: str, lifespan: Any = None) -> Any:
    """The FastAPI app; its handlers use ``app.state.engines`` (a :class:`RoutingEngines`),
    ``app.state.tokenizer`` and ``app.state.limits`` (:class:`~.validation.Limits`), set by ``lifespan``
    (or by the caller) before requests arrive. ``method`` names the statistics route ``/{method}/stats``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title=f"overdrive {method} routing server", lifespan=lifespan)
    created = int(time.time())

    def error(status: int, body: dict) -> Any:
        return JSONResponse(body, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:  # the safety net: JSON, never a dropped socket
        log.exception("unhandled error on %s", request.url.path)
        return error(500, error_body(f"{type(exc).__name__}: {exc}", 500, "InternalServerError"))

    @app.get("/health")
    async def health(request: Request) -> Any:
        engines = getattr(request.app.state, "engines", None)
        if engines is None or engines.dead:
            return error(503, error_body("an engine of this server is dead" if engines is not None else "starting",
                                         503, "ServiceUnavailableError"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "overdrive"}
        limits = getattr(request.app.state, "limits", None)
        if limits is not None:
            card["max_model_len"] = limits.max_model_len
        return {"object": "list", "data": [card]}

    async def stats(request: Request) -> Any:
        engines = request.app.state.engines
        t = engines.totals
        return {"method": method, **t, "routed_fraction": t["routed_tokens"] / t["tokens"] if t["tokens"] else 0.0,
                "threshold": engines.threshold, "router_batches": engines.batcher.calls,
                "router_rows": engines.batcher.rows}

    app.add_api_route(f"/{method}/stats", stats, methods=["GET"])

    async def handle(request: Request, chat: bool) -> Any:
        state = request.app.state
        engines, tok = state.engines, state.tokenizer
        if engines.dead:
            return error(503, error_body("an engine of this server died; the server is shutting down",
                                         503, "ServiceUnavailableError"))
        try:
            body = json.loads(await request.body())
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            return error(400, error_body(f"the request body is not valid JSON: {e}", 400, "BadRequestError"))
        try:
            v = validate(body, chat, tok, state.limits)
        except RequestError as e:
            return error(e.status, e.body())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if v.stream:
            return StreamingResponse(stream(engines, tok, rid, v, chat), media_type="text/event-stream")
        text = TextStream(tok, v.stop)
        tokens, routed, scores = [], [], []
        seqs: list[RoutedSequence] = []
        gen = engines.generate(v.prompt, v.sampling, seqs)
        try:
            async for ev in gen:
                tokens.append(ev.token)
                routed.append(ev.routed)
                scores.append(ev.score)
                text.push(ev.token, final=seqs[0].finished)
                if text.stopped:
                    break
        except Exception as e:  # noqa: BLE001 - this request fails; the server goes on (or exits if an engine died)
            log.error("request %s failed: %s: %s", rid, type(e).__name__, e)
            engines.totals["failed"] += 1
            return error(*engine_error(e))
        finally:
            await gen.aclose()
        finish = "stop" if text.stopped else (seqs[0].finish_reason or "length")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": tokens, "routed": routed}
        if v.sampling.return_scores:
            choice["router_scores"] = scores
        if chat:
            choice["message"] = {"role": "assistant", "content": text.text}
        else:
            choice.update(text=text.text, logprobs=None)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage(len(v.prompt), tokens, routed)}

    def usage(n_prompt: int, tokens: list[int], routed: list[bool]) -> dict:
        r = sum(routed)
        return {"prompt_tokens": n_prompt, "completion_tokens": len(tokens), "total_tokens": n_prompt + len(tokens),
                "routed_tokens": r, "small_tokens": len(tokens) - r}

    async def stream(engines: RoutingEngines, tok: Any, rid: str, v: Validated, chat: bool) -> AsyncIterator[str]:
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        text = TextStream(tok, v.stop)
        tokens, routed = [], []
        seqs: list[RoutedSequence] = []

        def data(obj: dict) -> str:
            return "data: " + json.dumps(obj) + "\n\n"

        def chunk(delta: str, new_ids: list[int], new_routed: list[bool], finish: str | None) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": new_ids, "routed": new_routed}
            if chat:
                c["delta"] = {"content": delta} if delta or finish is None else {}
            else:
                c.update(text=delta, logprobs=None)
            return data({"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                         "choices": [c]})

        if chat:
            yield data({"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        gen = engines.generate(v.prompt, v.sampling, seqs)
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
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes out as an event, as vLLM does
            log.error("request %s failed: %s: %s", rid, type(e).__name__, e)
            engines.totals["failed"] += 1
            yield data(engine_error(e)[1])
            yield "data: [DONE]\n\n"
            return
        finally:
            await gen.aclose()
        if v.include_usage:
            yield data({"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                        "choices": [], "usage": usage(len(v.prompt), tokens, routed)})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app

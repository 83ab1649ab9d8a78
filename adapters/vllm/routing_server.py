"""The two-engine token-routing server behind ``overdrive serve-NAME`` (see :mod:`.vllm_routing`).

Per request (:meth:`RoutingEngines.generate`), with the shared
:class:`~overdrive.contracts.token_routing.RoutedSequence` bookkeeping:

* a streaming-input session on the small engine (``AsyncLLM.add_request`` with an async generator
  of ``StreamingInput`` chunks, ``max_tokens=1`` each): chunk one is the prompt, every later chunk the
  one accepted token. vLLM keeps the session's KV between chunks and drops each chunk's uncomputed
  sampled token, so the session always holds exactly the accepted context. The small engine's
  capture worker (:mod:`.vllm_routing_worker`) returns, per step, the sampled token, its top-k raw
  logits and the final-norm hidden state (``PoolingRequestOutput``; that is why the session is read
  through ``add_request``'s collector rather than ``generate()``, which only yields ``RequestOutput``);
* the router scores all requests that stepped together in one batched call (:class:`RouterBatcher`);
* a routed position opens (first time) or continues a session on the large engine with every token it
  has not seen (an incremental extend) and takes its one sampled token instead.

HTTP: ``/v1/completions`` and ``/v1/chat/completions`` (streaming or not, ``n`` = 1), ``/v1/models``,
``/health``, ``/r2r/stats``. Extensions: request field ``router_threshold``; response
``choices[0].token_ids`` and ``choices[0].routed`` (per-token flags), and with
``return_router_scores: true`` ``choices[0].router_scores`` (the router logit per token, non-streaming);
``usage.routed_tokens`` and ``usage.small_tokens``. SIGINT/SIGTERM stop the HTTP server, then shut both engines down.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from fastapi import Request  # module level: FastAPI resolves handler annotations from module globals

import overdrive
from overdrive.config import ConfigError
from overdrive.contracts.token_routing import (RoutedSequence, Router, RouterInputs, check_shared_tokenizer,
                                               threshold_logit)
from overdrive.kinds import Kind

from overdrive.adapters.vllm.routing_worker import CONFIG_KEY, unpack_row, worker_cls_for_platform

log = logging.getLogger("overdrive.routing")


# ------------------------------------------------------------------------------------ router batching
class RouterBatcher:
    """Collects router inputs from every request that stepped in the same engine step and scores them
    in one batched call (requests woken by one engine output run before the flush callback)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int, asyncio.Future]] = []
        self._scheduled = False
        self.calls = 0
        self.rows = 0

    async def score(self, hidden: torch.Tensor, topk: torch.Tensor, token: int) -> float:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((hidden, topk, token, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, [], False
        live = [b for b in batch if not b[3].done()]
        if not live:
            return
        try:
            z = self.router.scores(RouterInputs(torch.stack([b[0] for b in live]), torch.stack([b[1] for b in live]),
                                                torch.tensor([b[2] for b in live])))
            self.calls += 1
            self.rows += len(live)
            for b, zi in zip(live, z.tolist()):
                b[3].set_result(zi)
        except Exception as e:  # noqa: BLE001 - delivered to every waiting request
            for b in live:
                b[3].set_exception(e)


# --------------------------------------------------------------------------------- engine sessions
class _Session:
    """A streaming-input session on one engine: :meth:`step` sends a chunk and returns its output."""

    def __init__(self, engine: Any, request_id: str, params: Any) -> None:
        self.engine, self.request_id, self.params = engine, request_id, params
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.collector: Any = None

    async def _inputs(self) -> AsyncIterator[Any]:
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt

        while (chunk := await self.chunks.get()) is not None:
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=chunk))

    async def step(self, chunk: list[int]) -> Any:
        await self.chunks.put(chunk)
        if self.collector is None:
            self.collector = await self.engine.add_request(self.request_id, self._inputs(), self.params)
        return await self.collector.get()

    async def close(self, abort: bool) -> None:
        if self.collector is None:
            return
        if abort:
            with contextlib.suppress(Exception):
                await self.engine.abort(self.collector.request_id, internal=True)
            self.collector.close()
            return
        await self.chunks.put(None)  # ends the session: vLLM finishes the paused request without a step
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.collector.get(), timeout=30)


@dataclasses.dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    threshold: float | None = None
    return_scores: bool = False

    def engine_params(self) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
                              seed=self.seed, ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA)


@dataclasses.dataclass
class StepEvent:
    token: int
    routed: bool
    score: float


class RoutingEngines:
    """The small and large ``AsyncLLM`` engines, the router and the tokenizer of one server."""

    def __init__(self, small: Any, large: Any, router: Router, topk: int, threshold: float, eos_ids: frozenset[int]):
        self.small, self.large, self.router, self.topk = small, large, router, topk
        self.threshold = threshold
        self.eos_ids = eos_ids
        self.batcher = RouterBatcher(router)
        self.totals = {"requests": 0, "tokens": 0, "routed_tokens": 0, "large_calls": 0}
        self._down = False

    async def generate(self, prompt: list[int], sp: Sampling, seq_out: list[RoutedSequence] | None = None
                       ) -> AsyncIterator[StepEvent]:
        stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_ids))
        seq = RoutedSequence(prompt, sp.max_tokens, frozenset(stop))
        if seq_out is not None:
            seq_out.append(seq)
        threshold = self.threshold if sp.threshold is None else sp.threshold
        cut = threshold_logit(threshold)
        rid = uuid.uuid4().hex
        params = sp.engine_params()
        small = _Session(self.small, f"{rid}-small", params)
        large: _Session | None = None
        self.totals["requests"] += 1
        try:
            while not seq.finished:
                out = await small.step(seq.small_feed())
                token, topk, hidden = unpack_row(out.outputs.data, self.topk)
                z = await self.batcher.score(hidden, topk, token)
                routed = z >= cut
                if routed:
                    if large is None:
                        large = _Session(self.large, f"{rid}-large", params)
                    lout = await large.step(seq.large_feed())
                    token = int(lout.outputs[0].token_ids[-1])
                    self.totals["large_calls"] += 1
                seq.accept(token, routed)
                self.totals["tokens"] += 1
                self.totals["routed_tokens"] += int(routed)
                yield StepEvent(token, routed, z)
        finally:  # a finished sequence ends its sessions; a cancelled or failed one aborts them
            await small.close(abort=not seq.finished)
            if large is not None:
                await large.close(abort=not seq.finished)

    def shutdown(self) -> None:
        """Shut both engines down (concurrently: each may wait out vLLM's grace period); idempotent."""
        import threading

        engines, self._down = ([] if self._down else [self.small, self.large]), True

        def stop(engine: Any) -> None:
            with contextlib.suppress(Exception):
                engine.shutdown()

        threads = [threading.Thread(target=stop, args=(e,), daemon=True) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)


# ------------------------------------------------------------------------------------------ startup
def _set_cpu_env(args: Any) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if args.kv_cache_gib:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(args.kv_cache_gib))
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def check_inputs(args: Any, method: str) -> tuple[Any, Any, int]:
    """Tokenizers shared, router loadable for the small model: (tokenizer, router, topk). Raises
    ConfigError before any engine starts."""
    from transformers import AutoTokenizer

    for name in ("small", "large", "router"):
        if not Path(getattr(args, name)).is_dir():
            raise ConfigError(f"--{name} {getattr(args, name)}: not a directory")
    tok_s = AutoTokenizer.from_pretrained(args.small)
    tok_l = AutoTokenizer.from_pretrained(args.large)
    try:
        check_shared_tokenizer(tok_s, tok_l, f"--small {args.small}", f"--large {args.large}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold}: must be within [0, 1]")
    impl = overdrive.get_method(method, Kind.ROUTING).load_impl()
    device = args.router_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cpu" and getattr(args, "router_threads", None):
        torch.set_num_threads(args.router_threads)
    router = impl.load_router(args.router, args.small, device=device)
    return tok_s, router, int(router.topk)


def engine_args(args: Any, which: str, topk: int) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    kw: dict[str, Any] = dict(model=str(getattr(args, which)), dtype=args.dtype, enable_prefix_caching=True,
                              tensor_parallel_size=getattr(args, f"{which}_tensor_parallel_size"),
                              enforce_eager=args.enforce_eager or cpu)
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if not cpu:
        kw["gpu_memory_utilization"] = getattr(args, f"{which}_gpu_memory_utilization")
    if which == "small":
        kw.update(worker_cls=worker_cls_for_platform(), async_scheduling=False,
                  additional_config={CONFIG_KEY: {"topk": topk}})
    return AsyncEngineArgs(**kw)


def cpu_binds(cores: list[int], tp_small: int, tp_large: int) -> tuple[str, str] | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` values giving each engine its own half of ``cores`` (each half split
    over the engine's tensor-parallel ranks with ``|``), or None when there are too few cores. Without
    it both engines' CPU workers bind the same cores and the idle one's OpenMP threads slow the other
    (measured on a 2-core machine: a small-model step 12-16 ms shared, 9-10 ms split)."""
    half = len(cores) // 2
    if half < max(tp_small, tp_large):
        return None

    def bind(part: list[int], tp: int) -> str:
        per = len(part) // tp
        ranks = [part[i * per:(i + 1) * per] for i in range(tp)]
        return "|".join(",".join(str(c) for c in r) for r in ranks)

    return bind(cores[:half], tp_small), bind(cores[half:2 * half], tp_large)


def start_engines(args: Any, router: Router, topk: int, eos_ids: frozenset[int]) -> RoutingEngines:
    """Start the small engine (capture worker), then the large one; a failure stops what started."""
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    _set_cpu_env(args)
    binds = None
    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        binds = cpu_binds(sorted(os.sched_getaffinity(0)), args.small_tensor_parallel_size,
                          args.large_tensor_parallel_size)
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    try:
        if binds:  # engine processes read it when they start
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binds[0]
        small = AsyncLLM.from_engine_args(engine_args(args, "small", topk))
        try:
            if binds:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binds[1]
            large = AsyncLLM.from_engine_args(engine_args(args, "large", topk))
        except BaseException:
            small.shutdown()
            raise
    finally:
        if binds:
            if saved is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    if binds:
        log.info("CPU threads: small engine on cores %s, large engine on cores %s", *binds)
    threshold = router.threshold if args.threshold is None else args.threshold
    return RoutingEngines(small, large, router, topk, threshold, eos_ids)


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


def serve(args: Any, method: str) -> int:
    """Run the server until SIGINT/SIGTERM; both engines are shut down on the way out."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:  # fail fast, before any engine starts
        tok, router, topk = check_inputs(args, method)
    except ConfigError as e:
        print(f"overdrive serve-{method}: {e}", file=sys.stderr)
        return 2
    eos = tok.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
    started: list[RoutingEngines] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engines = start_engines(args, router, topk, eos_ids)
        started.append(engines)
        app.state.engines, app.state.tokenizer = engines, tok
        log.info("overdrive serve-%s: small %s, large %s, router %s (top-%d, threshold %.4g)",
                 method, args.small, args.large, args.router, topk, engines.threshold)
        print(f"overdrive serve-{method}: ready on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            log.info("overdrive serve-%s: shutting down both engines", method)
            engines.shutdown()

    app = build_app(args.served_model_name or method, lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                          timeout_graceful_shutdown=10))
    try:
        server.run()
    finally:
        for engines in started:
            engines.shutdown()
    return 0 if started else 1

"""The two engines of a token-routing server and the per-request routing loop.

Per request (:meth:`RoutingEngines.generate`), with the shared
:class:`~overdrive.contracts.token_routing.RoutedSequence` bookkeeping:

* a streaming-input session on the small engine (``AsyncLLM.add_request`` with an async generator
  of ``StreamingInput`` chunks, ``max_tokens=1`` each): chunk one is the prompt, every later chunk the
  one accepted token. vLLM keeps the session's KV between chunks and drops each chunk's uncomputed
  sampled token, so the session always holds exactly the accepted context. The small engine's
  capture worker (:mod:`.worker`) returns, per step, the sampled token, its top-k raw
  logits and the final-norm hidden state (``PoolingRequestOutput``; that is why the session is read
  through ``add_request``'s collector rather than ``generate()``, which only yields ``RequestOutput``);
* the router scores all requests that stepped together in one batched call (:class:`RouterBatcher`);
* a routed position opens (first time) or continues a session on the large engine with every token it
  has not seen (an incremental extend) and takes its one sampled token instead.

An engine error reaches only the requests waiting on it (vLLM delivers it to their output collectors;
a router batch that fails is retried row by row); an engine's death shows in :attr:`RoutingEngines.dead`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from typing import Any, AsyncIterator

import torch

from overdrive.contracts.token_routing import RoutedSequence, Router, RouterInputs, threshold_logit

from .worker import unpack_row

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
            z = self._scores(live)
        except Exception:  # noqa: BLE001 - isolate: score each row alone, so only a failing row's request fails
            for b in live:
                try:
                    b[3].set_result(self._scores([b])[0])
                except Exception as e:  # noqa: BLE001 - delivered to that request
                    b[3].set_exception(e)
            return
        for b, zi in zip(live, z):
            b[3].set_result(zi)

    def _scores(self, rows: list) -> list[float]:
        z = self.router.scores(RouterInputs(torch.stack([b[0] for b in rows]), torch.stack([b[1] for b in rows]),
                                            torch.tensor([b[2] for b in rows])))
        self.calls += 1
        self.rows += len(rows)
        return z.tolist()


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
        self.totals = {"requests": 0, "tokens": 0, "routed_tokens": 0, "large_calls": 0, "failed": 0}
        self._down = False

    @property
    def dead(self) -> bool:
        """True once either engine has died (vLLM's ``AsyncLLM.errored``): the server must not go on."""
        return bool(self.small.errored or self.large.errored)

    def limits(self) -> tuple[int, int]:
        """(max_model_len, vocab_size) every request must fit: the smaller of the two engines' values."""
        confs = [self.small.model_config, self.large.model_config]
        return min(c.max_model_len for c in confs), min(c.get_vocab_size() for c in confs)

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

    def shutdown(self, timeout: float = 60.0) -> None:
        """Shut both engines down (concurrently: each may wait out vLLM's grace period), waiting at most
        ``timeout`` seconds; idempotent."""
        import threading

        engines, self._down = ([] if self._down else [self.small, self.large]), True

        def stop(engine: Any) -> None:
            with contextlib.suppress(Exception):
                engine.shutdown()

        threads = [threading.Thread(target=stop, args=(e,), daemon=True) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout)

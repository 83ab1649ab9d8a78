"""vLLM worker classes for the *small* engine of a token-routing server (imported by vLLM only).

A router reads, at every sampled position, the small model's last hidden state (after the final
norm) and its top-k raw logits. vLLM 0.32's model runner holds both between ``execute_model`` and
``sample_tokens`` (``GPUModelRunner.execute_model_state``: ``sample_hidden_states`` are the final-norm
hidden states at the sampled rows, ``logits`` the model's raw logits for them, before the sampler
applies temperature or penalties in place). The worker subclass reads them before sampling and, after
sampling, returns one float32 row per request that sampled a token as that request's pooler output,
the per-request tensor field vLLM's scheduler already forwards to the client::

    row = [sampled token id, top-k raw logits (k, descending), hidden state (d)]

Requests still in a partial prefill sample nothing and get ``None`` (vLLM's own convention). The
client reads the rows from ``PoolingRequestOutput.outputs.data`` (:mod:`.engines`).
``k`` comes from ``--additional-config '{"overdrive_routing": {"topk": k}}'``. Needs synchronous
scheduling (``async_scheduling=False``: an asynchronous step returns its output object before the
tokens exist). Symbols touched: docs/ledger.md.
"""
from __future__ import annotations

from typing import Any

import torch

CONFIG_KEY = "overdrive_routing"


def pack_rows(topk: torch.Tensor, hidden: torch.Tensor, sampled: list[list[int]]) -> list[torch.Tensor | None]:
    """One row per request: [token, top-k logits, hidden] (float32, CPU), None where nothing was sampled."""
    rows: list[torch.Tensor | None] = []
    for i, toks in enumerate(sampled):
        if len(toks) != 1:
            rows.append(None)
            continue
        rows.append(torch.cat([torch.tensor([float(toks[0])]), topk[i], hidden[i]]))
    return rows


def unpack_row(row: torch.Tensor, topk: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(token, top-k logits (k,), hidden (d,)) from a :func:`pack_rows` row."""
    return int(row[0]), row[1:1 + topk], row[1 + topk:]


class _CaptureMixin:
    """Mixed into the platform's worker: see the module docstring."""

    def _routing_topk(self) -> int:
        extra = getattr(self, "vllm_config").additional_config or {}
        conf = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
        if not isinstance(conf, dict) or not isinstance(conf.get("topk"), int) or conf["topk"] < 1:
            raise ValueError(f"the routing capture worker needs --additional-config "
                             f"'{{\"{CONFIG_KEY}\": {{\"topk\": K}}}}' with K >= 1, got {conf!r}")
        return conf["topk"]

    def sample_tokens(self, grammar_output: Any) -> Any:
        from vllm.v1.outputs import ModelRunnerOutput

        state = getattr(self, "model_runner").execute_model_state
        captured = None
        if state is not None:
            k = self._routing_topk()
            with torch.no_grad():
                topk = state.logits.topk(k, dim=-1).values.float().cpu()
                hidden = state.sample_hidden_states.float().cpu()
            captured = (topk, hidden)
        out = super().sample_tokens(grammar_output)  # type: ignore[misc]
        if captured is not None and isinstance(out, ModelRunnerOutput) and out.req_ids:
            n = len(out.req_ids)
            topk, hidden = captured
            if topk.shape[0] != n or hidden.shape[0] != n:
                raise RuntimeError(f"routing capture: {topk.shape[0]} logit rows and {hidden.shape[0]} hidden rows for "
                                   f"{n} requests (speculative decoding is not supported on the small engine)")
            out.pooler_output = pack_rows(topk, hidden, out.sampled_token_ids or [[] for _ in range(n)])
        return out


def _gpu_worker() -> type:
    from vllm.v1.worker.gpu_worker import Worker

    return type("RoutingCaptureWorker", (_CaptureMixin, Worker), {"__module__": __name__})


def _cpu_worker() -> type:
    from vllm.v1.worker.cpu_worker import CPUWorker

    return type("RoutingCaptureCPUWorker", (_CaptureMixin, CPUWorker), {"__module__": __name__})


_FACTORIES = {"RoutingCaptureWorker": _gpu_worker, "RoutingCaptureCPUWorker": _cpu_worker}
_built: dict[str, type] = {}


def worker_cls_for_platform() -> str:
    """The qualified name vLLM's ``worker_cls`` needs on this machine's platform."""
    from vllm.platforms import current_platform

    name = "RoutingCaptureCPUWorker" if current_platform.is_cpu() else "RoutingCaptureWorker"
    return f"{__name__}.{name}"


def __getattr__(name: str) -> Any:
    # built on first access so that importing this module does not import both platforms' workers
    if name in _FACTORIES:
        if name not in _built:
            _built[name] = _FACTORIES[name]()
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

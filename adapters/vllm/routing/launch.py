"""Start-up and run of ``overdrive serve-NAME``: input checks, the two engines, uvicorn, shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import torch

import overdrive
from overdrive.config import ConfigError
from overdrive.contracts.token_routing import Router, check_shared_tokenizer
from overdrive.kinds import Kind

from .api import build_app
from .engines import RoutingEngines
from .validation import Limits
from .worker import CONFIG_KEY, worker_cls_for_platform

log = logging.getLogger("overdrive.routing")


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


#: exit status when an engine died while serving (a supervisor restarts the server); 2 is bad input at startup
EXIT_ENGINE_DIED = 1
#: seconds between noticing a dead engine and stopping: in-flight requests get their error bodies and
#: /health answers 503 meanwhile
DEAD_GRACE_S = 1.0
#: seconds each engine's shutdown may take before the remaining child processes are killed
ENGINE_STOP_S = 10.0


def serve(args: Any, method: str) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0) or an engine's death (exit :data:`EXIT_ENGINE_DIED`); both
    engines and every child process are stopped on the way out."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:  # fail fast, before any engine starts
        tok, router, topk = check_inputs(args, method)
    except ConfigError as e:
        print(f"overdrive serve-{method}: {e}", file=sys.stderr)
        return 2
    eos = tok.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
    model_name = args.served_model_name or method
    started: list[RoutingEngines] = []
    died: list[bool] = []

    async def watch(engines: RoutingEngines) -> None:
        while not engines.dead:
            await asyncio.sleep(0.2)
        died.append(True)
        log.error("overdrive serve-%s: an engine died (small errored: %s, large errored: %s); /health answers 503, "
                  "exiting with status %d", method, engines.small.errored, engines.large.errored, EXIT_ENGINE_DIED)
        await asyncio.sleep(DEAD_GRACE_S)
        server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engines = start_engines(args, router, topk, eos_ids)
        started.append(engines)
        app.state.engines, app.state.tokenizer = engines, tok
        app.state.limits = Limits(model_name, *engines.limits())
        log.info("overdrive serve-%s: small %s, large %s, router %s (top-%d, threshold %.4g, max_model_len %d, "
                 "vocabulary %d)", method, args.small, args.large, args.router, topk, engines.threshold,
                 app.state.limits.max_model_len, app.state.limits.vocab_size)
        watchdog = asyncio.create_task(watch(engines))
        print(f"overdrive serve-{method}: ready on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            watchdog.cancel()
            t0 = time.monotonic()
            log.info("overdrive serve-%s: shutting down both engines", method)
            engines.shutdown(timeout=ENGINE_STOP_S)
            stop_children()  # here, not only after server.run(): uvicorn re-raises SIGTERM/SIGINT when it returns
            log.info("overdrive serve-%s: engines stopped in %.1f s", method, time.monotonic() - t0)

    app = build_app(method, model_name, lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                          timeout_graceful_shutdown=args.shutdown_timeout))
    try:
        server.run()
    finally:
        for engines in started:
            engines.shutdown(timeout=ENGINE_STOP_S)
        stop_children()
    status = EXIT_ENGINE_DIED if died else (0 if started else 1)
    log.info("overdrive serve-%s: exiting with status %d", method, status)
    return status


def stop_children(timeout: float = 3.0) -> None:
    """Terminate, then kill, whatever child process is left (an engine that did not stop in time). Exited
    processes not yet reaped and multiprocessing's resource tracker (it ends with this process, after
    releasing shared memory) are left alone."""
    import psutil

    def live(k: Any) -> bool:
        try:
            return k.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(k.cmdline())
        except psutil.Error:
            return False

    kids = [k for k in psutil.Process().children(recursive=True) if live(k)]
    if not kids:
        return
    log.warning("stopping %d leftover child processes: %s", len(kids), [(k.pid, _name(k)) for k in kids])
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.terminate()
    _, alive = psutil.wait_procs(kids, timeout=timeout)
    for k in alive:
        with contextlib.suppress(psutil.Error):
            k.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _name(p: Any) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001 - gone meanwhile
        return "?"

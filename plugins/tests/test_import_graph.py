"""The package's module graph: every module imports, no import cycle inside a method folder, no edge
from a method to an adapter.

The graph is read from the source (:mod:`overdrive.testing.imports`), so imports inside functions
count: a cycle hidden behind a lazy import is still a cycle a reader has to untangle. The checker is
itself tested on a small synthetic package with a planted cycle.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import overdrive
from overdrive.testing.imports import cycles, hits, import_graph, module_files

ROOT = Path(__file__).resolve().parents[2]
#: source folder -> import name of the package it is
ROOTS = {ROOT / "plugins": "overdrive", ROOT / "adapters": "overdrive.adapters", ROOT / "kernels": "overdrive.kernels"}
ADAPTER_MODULES = ("overdrive.adapters", "overdrive.diffusers", "overdrive.transformers")
#: engines a module may need at import time; such a module is skipped only where its engine is absent
ENGINES = ("vllm", "sglang", "diffusers", "transformers", "triton")


def all_modules() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for root, package in ROOTS.items():
        files.update(module_files(root, package))
    return files


def method_packages() -> list[str]:
    """Import names of the built-in method folders (from the registry, not a hand-kept list)."""
    out = set()
    for spec in overdrive.get_registry().methods():
        module = spec.impl.split(":")[0] if isinstance(spec.impl, str) else type(spec.impl).__module__
        if module.startswith("overdrive."):
            out.add(".".join(module.split(".")[:2]))
    return sorted(out)


def _inside(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def _engine_side(mod: str) -> bool:
    return any(_inside(mod, p) for p in ADAPTER_MODULES + ("overdrive.benchmarks", "overdrive.testing"))


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_finds_a_planted_cycle_lazy_imports_included(tmp_path):
    _write(tmp_path, {
        "__init__.py": "",
        "meth/__init__.py": "from .runtime import run\n",            # a package importing its own modules
        "meth/config.py": "import json\n",
        "meth/runtime.py": "from . import config\nfrom .math import f\n",
        "meth/math.py": "def f():\n    from .calibrate import g  # lazy\n    return g\n",
        "meth/calibrate.py": "from overdrive_fake.meth.runtime import run\nimport pkg.meth.runtime as r\n",
        "meth/tests/test_x.py": "from ..runtime import run\n",       # tests are not modules of the package
    })
    files = module_files(tmp_path, "pkg")
    assert set(files) == {"pkg", "pkg.meth", "pkg.meth.config", "pkg.meth.runtime", "pkg.meth.math",
                          "pkg.meth.calibrate"}
    graph = import_graph(files)
    assert graph["pkg.meth"] == {"pkg.meth.runtime"}
    assert graph["pkg.meth.runtime"] == {"pkg.meth.config", "pkg.meth.math"}  # not its parent package
    assert graph["pkg.meth.math"] == {"pkg.meth.calibrate"}
    assert cycles(graph) == [["pkg.meth.calibrate", "pkg.meth.math", "pkg.meth.runtime"]]
    (tmp_path / "meth/math.py").write_text("def f():\n    return 1\n")      # break it
    assert cycles(import_graph(module_files(tmp_path, "pkg"))) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_covers_every_room():
    files = all_modules()
    assert {"overdrive.registry", "overdrive.ditfastattn.method", "overdrive.benchmarks.demo",
            "overdrive.adapters.vllm", "overdrive.adapters._register", "overdrive.kernels.dispatch"} <= set(files)
    assert not [m for m in files if ".tests" in m]
    assert {"overdrive.mbq", "overdrive.ditfastattn", "overdrive.r2r", "overdrive.vgdfr"} <= set(method_packages())


def test_no_import_cycle_inside_a_method_folder():
    graph = import_graph(all_modules())
    bad = []
    for package in method_packages():
        sub = {m: {t for t in e if _inside(t, package)} for m, e in graph.items() if _inside(m, package)}
        bad += [" -> ".join(c) for c in cycles(sub)]
    assert not bad, "import cycles (lazy imports included) inside method folders:\n" + "\n".join(bad)


def test_no_method_module_imports_an_adapter():
    graph = import_graph(all_modules())
    bad = [f"{m} -> {t}" for package in method_packages() for m, e in graph.items() if _inside(m, package)
           for t in hits(e, ADAPTER_MODULES)]
    assert not bad, "methods reach frameworks through their kind contract:\n" + "\n".join(bad)


_IMPORT_ALL = """
import importlib, importlib.util, json, sys
names, engines = json.loads(sys.argv[1]), json.loads(sys.argv[2])
failed, skipped = {}, {}
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in engines and importlib.util.find_spec(top) is None:
            skipped[name] = top
        else:
            failed[name] = f"{type(e).__name__}: {e}"
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"failed": failed, "skipped": skipped}))
"""


#: what each import run covers: the runtime core, methods and kernels (fast), and the modules that
#: import engines at module level (slow tier): adapters, the facades, benchmarks and test fixtures
GROUPS = {
    "runtime": lambda m: not _engine_side(m),
    "engines": _engine_side,
}


@pytest.mark.parametrize("group", ["runtime", pytest.param("engines", marks=pytest.mark.slow)])
def test_every_module_imports(group):
    """Each module imports in a fresh process; a module is skipped only when the engine it needs at
    import time is not installed."""
    names = [m for m in all_modules() if GROUPS[group](m)]
    assert len(names) > 20
    run = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(names), json.dumps(ENGINES)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert not out["failed"], "modules that do not import:\n" + "\n".join(f"{k}: {v}" for k, v in out["failed"].items())
    assert all(importlib.util.find_spec(e) is None for e in out["skipped"].values())

"""Methods reach frameworks only through their kind contract: no method or example imports an adapter.

Checked on the source (AST), so a method cannot pass by importing lazily inside a function:

* no module of a built-in method folder (plugins/<method>/, found from the registry) or of
  examples/ imports ``overdrive.adapters`` in any spelling (absolute, ``from overdrive import
  adapters``, relative, ``importlib.import_module``);
* nor the user-facing facades ``overdrive.diffusers`` / ``overdrive.transformers`` (they re-export
  adapters); every file of a method folder is checked, with no exception (benchmarks live in
  ``overdrive.benchmarks``; a method that offers a framework's loop reaches it through
  :func:`overdrive.driver`);
* DiT-caching and frame-rate-schedule methods (built-in and the example plugin's) import no
  ``diffusers`` at all: the diffusers hook layer and the frame-rate integration hand them
  framework-neutral calls;
* generic adapters (adapters/) name no built-in method in their code: no method-name default, error
  prefix or route (names, messages and defaults come from the method spec and the registry; usage
  examples in docstrings may name one);
* nothing of the runtime (the ``overdrive`` package except ``overdrive.testing``,
  ``overdrive.benchmarks`` and tests; ``overdrive.adapters``; ``overdrive.kernels``) imports
  ``overdrive.testing``, the test fixtures.
* no module of a built-in method folder imports ``transformers`` in any spelling (lazily inside a
  function, ``importlib.import_module("transformers...")``, ``__import__``): LLM calibrations go through
  the LLM calibration layer (:mod:`overdrive.contracts.llm_calibration`, implemented in adapters/).

Tests inside method folders are not method code and may import anything.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

import overdrive
from overdrive.kinds import Kind
from overdrive.testing.imports import hits, imported_modules

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
EXAMPLES = ROOT / "examples"
ADAPTERS = ("overdrive.adapters",)
FACADES = ("overdrive.diffusers", "overdrive.transformers")
TESTING = ("overdrive.testing",)
#: folders of the runtime (besides plugins/ minus NOT_RUNTIME) and their import names
RUNTIME_ROOTS = {ROOT / "adapters": "overdrive.adapters", ROOT / "kernels": "overdrive.kernels"}
NOT_RUNTIME = (PLUGINS / "testing", PLUGINS / "benchmarks")


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "tests" not in p.relative_to(folder).parts)


def _package(path: Path) -> str:
    """Import name of the package a file belongs to."""
    if path.is_relative_to(PLUGINS):
        return ".".join(("overdrive", *path.parent.relative_to(PLUGINS).parts))
    for root, name in RUNTIME_ROOTS.items():
        if path.is_relative_to(root):
            return ".".join((name, *path.parent.relative_to(root).parts))
    parts: list[str] = []
    d = path.parent
    while (d / "__init__.py").is_file():
        parts.insert(0, d.name)
        d = d.parent
    return ".".join(parts)


def method_folders() -> dict[str, Path]:
    """Built-in method name -> its folder under plugins/ (from the registry, not a hand-kept list)."""
    out = {}
    for spec in overdrive.get_registry().methods():
        module = spec.impl.split(":")[0] if isinstance(spec.impl, str) else type(spec.impl).__module__
        if module.startswith("overdrive."):
            out[spec.name] = PLUGINS / module.split(".")[1]
    return out


def test_the_checker_sees_every_spelling():
    pkg = "overdrive.mymethod"
    for src in ("import overdrive.adapters.diffusers", "from overdrive.adapters import diffusers",
                "from overdrive import adapters", "from ..adapters.diffusers import enable", "from .. import adapters",
                "def f():\n    import importlib\n    importlib.import_module('overdrive.adapters.vllm')"):
        assert hits(imported_modules(src, pkg), ADAPTERS), src
    assert hits(imported_modules("from overdrive import diffusers as odd", pkg), FACADES)
    assert not hits(imported_modules("from overdrive.contracts import DiTHooks\nfrom .plan import Plan", pkg),
                     ADAPTERS + FACADES)
    assert hits(imported_modules("def f():\n    from diffusers.hooks import ModelHook", pkg), ("diffusers",))
    for src in ("import transformers", "from transformers import AutoModelForCausalLM",
                "def f():\n    from transformers.integrations.sdpa_attention import sdpa_attention_forward",
                "import transformers.models.llama as L", "def f():\n    import importlib\n    importlib.import_module('transformers')",
                "x = __import__('transformers.cache_utils')"):
        assert hits(imported_modules(src, pkg), ("transformers",)), src
    assert not hits(imported_modules("from overdrive import transformers_utils\nimport transformers_x", pkg),
                     ("transformers",))


def test_method_folders_are_found():
    folders = method_folders()
    assert {"ditfastattn", "mbq", "pmkvq", "framefusion"} <= set(folders)
    assert all((f / "plugin.py").is_file() for f in folders.values())


@pytest.mark.parametrize("where", ["methods", "examples"])
def test_no_method_imports_an_adapter(where):
    folders = list(method_folders().values()) if where == "methods" else [EXAMPLES]
    bad = []
    for folder in folders:
        for path in _sources(folder):
            mods = imported_modules(path.read_text(), _package(path))
            bad += [f"{_show(path)}: {m}" for m in hits(mods, ADAPTERS + FACADES)]
    assert not bad, "methods reach frameworks through their kind contract, not adapters:\n" + "\n".join(bad)


def test_dit_methods_import_no_diffusers(example_plugin):
    files: list[Path] = []
    for spec in example_plugin.methods():
        if spec.kind not in (Kind.DIT_CACHE, Kind.FRAME_RATE):
            continue
        module = spec.impl.split(":")[0]
        origin = Path(importlib.util.find_spec(module).origin)
        files += _sources(origin.parent)
    assert any(p.name == "stepcache.py" for p in files) and any(p.parent.name == "ditfastattn" for p in files)
    assert any(p.parent.name == "vgdfr" for p in files)
    bad = [f"{_show(p)}: {m}" for p in files
           for m in hits(imported_modules(p.read_text(), _package(p)), ("diffusers",))]
    assert not bad, "DiT methods get framework-neutral calls from the diffusers hook layer:\n" + "\n".join(bad)


def test_methods_import_no_transformers():
    """Method folders drive LLMs through the LLM calibration layer and their kind contracts, never transformers."""
    files = [p for folder in method_folders().values() for p in _sources(folder)]
    assert any(p.parent.name == "mbq" for p in files) and any(p.parent.name == "r2r" for p in files)
    bad = [f"{_show(p)}: {m}" for p in files
           for m in hits(imported_modules(p.read_text(), _package(p)), ("transformers",))]
    assert not bad, ("method folders import no transformers (use overdrive.contracts.llm_calibration):\n"
                     + "\n".join(bad))


def runtime_sources() -> list[Path]:
    """Every non-test source of the runtime: plugins/ (but its fixtures and benchmarks), adapters/, kernels/."""
    files = [p for p in _sources(PLUGINS) if not any(p.is_relative_to(d) for d in NOT_RUNTIME)]
    for root in RUNTIME_ROOTS:
        files += _sources(root)
    return files


def test_the_runtime_imports_no_test_fixture():
    files = runtime_sources()
    shown = {_show(p) for p in files}
    assert {"plugins/registry.py", "plugins/mbq/data.py", "adapters/vllm/__init__.py", "kernels/dispatch.py"} <= shown
    assert not any(s.startswith(("plugins/testing/", "plugins/benchmarks/")) or "/tests/" in s for s in shown)
    assert hits(imported_modules("from ..testing.vlm import sample_image", "overdrive.mbq"), TESTING)
    bad = [f"{_show(p)}: {m}" for p in files for m in hits(imported_modules(p.read_text(), _package(p)), TESTING)]
    assert not bad, "the runtime must not depend on the test fixtures (overdrive.testing):\n" + "\n".join(bad)


def _code_strings(source: str) -> list[tuple[int, str]]:
    """String constants of a source that are not docstrings (line, text)."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_generic_adapters_name_no_method():
    names = sorted(method_folders())
    word = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b", re.IGNORECASE)
    assert [t for _, t in _code_strings('def f(m="r2r"):\n    """Run framefusion."""\n    raise ValueError("moa: x")\n')
            if word.search(t)] == ["r2r", "moa: x"]
    bad = [f"{_show(p)}:{line}: {text[:80]!r}" for p in _sources(ROOT / "adapters")
           for line, text in _code_strings(p.read_text()) if word.search(text)]
    assert not bad, "method names in generic adapters (take them from the spec / registry):\n" + "\n".join(bad)

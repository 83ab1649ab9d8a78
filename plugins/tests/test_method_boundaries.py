"""Methods reach frameworks only through their kind contract: no method or example imports an adapter.

Checked on the source (AST), so a method cannot pass by importing lazily inside a function:

* no module of a built-in method folder (plugins/<method>/, found from the registry) or of
  examples/ imports ``overdrive.adapters`` in any spelling (absolute, ``from overdrive import
  adapters``, relative, ``importlib.import_module``);
* nor the user-facing facades ``overdrive.diffusers`` / ``overdrive.transformers`` (they re-export
  adapters);
* driver scripts (``bench*``, ``gpu_bench*``, ``perplexity*``) are exempt from both: they are not
  method code but measure the method through the engines, as a user or the engine integration runs it;
* :data:`ALLOWED` lists the remaining exceptions one by one, each with its reason;
* DiT-caching and frame-rate-schedule methods (built-in and the example plugin's) import no
  ``diffusers`` at all outside benchmark scripts: the diffusers hook layer and the frame-rate
  integration hand them framework-neutral calls;
* no module of a built-in method folder imports ``transformers`` in any spelling (lazily inside a
  function, ``importlib.import_module("transformers...")``, ``__import__``): LLM calibrations go through
  the LLM calibration layer (:mod:`overdrive.contracts.llm_calibration`, implemented in adapters/).

Tests inside method folders are not method code and may import anything.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import overdrive
from overdrive.kinds import Kind

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
EXAMPLES = ROOT / "examples"
ADAPTERS = ("overdrive.adapters",)
FACADES = ("overdrive.diffusers", "overdrive.transformers")
#: (file relative to the repository, imported module) -> why it is allowed
ALLOWED = {
    ("plugins/r2r/__init__.py", "overdrive.transformers"):
        "overdrive.r2r.generate is the public routing entry point of the method; it only delegates (lazily) to the "
        "transformers facade's routed_generate, which serves every token-routing method",
}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source imports or names in ``import_module``/``__import__`` (relative resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def _hits(mods: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _is_bench(path: Path) -> bool:
    return path.name.startswith(("bench", "gpu_bench", "perplexity"))


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "tests" not in p.relative_to(folder).parts)


def _package(path: Path) -> str:
    """Import name of the package a file belongs to."""
    if path.is_relative_to(PLUGINS):
        return ".".join(("overdrive", *path.parent.relative_to(PLUGINS).parts))
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
        assert _hits(imported_modules(src, pkg), ADAPTERS), src
    assert _hits(imported_modules("from overdrive import diffusers as odd", pkg), FACADES)
    assert not _hits(imported_modules("from overdrive.contracts import DiTHooks\nfrom .plan import Plan", pkg),
                     ADAPTERS + FACADES)
    assert _hits(imported_modules("def f():\n    from diffusers.hooks import ModelHook", pkg), ("diffusers",))
    for src in ("import transformers", "from transformers import AutoModelForCausalLM",
                "def f():\n    from transformers.integrations.sdpa_attention import sdpa_attention_forward",
                "import transformers.models.llama as L", "def f():\n    import importlib\n    importlib.import_module('transformers')",
                "x = __import__('transformers.cache_utils')"):
        assert _hits(imported_modules(src, pkg), ("transformers",)), src
    assert not _hits(imported_modules("from overdrive import transformers_utils\nimport transformers_x", pkg),
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
            if _is_bench(path):
                continue
            bad += [f"{_show(path)}: {m}" for m in _hits(mods, ADAPTERS + FACADES)
                    if (_show(path), m) not in ALLOWED]
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
    bad = [f"{_show(p)}: {m}" for p in files if not _is_bench(p)
           for m in _hits(imported_modules(p.read_text(), _package(p)), ("diffusers",))]
    assert not bad, "DiT methods get framework-neutral calls from the diffusers hook layer:\n" + "\n".join(bad)


def test_methods_import_no_transformers():
    """Method folders drive LLMs through the LLM calibration layer and their kind contracts, never transformers."""
    files = [p for folder in method_folders().values() for p in _sources(folder)]
    assert any(p.parent.name == "mbq" for p in files) and any(p.parent.name == "r2r" for p in files)
    bad = [f"{_show(p)}: {m}" for p in files
           for m in _hits(imported_modules(p.read_text(), _package(p)), ("transformers",))]
    assert not bad, ("method folders import no transformers (use overdrive.contracts.llm_calibration):\n"
                     + "\n".join(bad))

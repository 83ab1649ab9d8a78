"""Reading imports from source (AST) for the layout tests: what a file imports, and the module graph.

Read from the source, not from ``sys.modules``, so imports inside functions (lazy imports) count
and nothing is executed.
"""
from __future__ import annotations

import ast
from pathlib import Path


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source imports or names in ``import_module``/``__import__`` (relative resolved).

    ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (``c`` may be a module or a name); ``package`` is
    the import name of the package the file belongs to (for relative imports).
    """
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


def hits(mods: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules of ``mods`` that are one of ``prefixes`` or inside one."""
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


def module_files(root: Path, package: str, skip: tuple[str, ...] = ("tests",)) -> dict[str, Path]:
    """Import name -> file of every module under ``root`` (imported as ``package``), without the
    folders named in ``skip`` (tests and their probes are not modules of the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        if any(part in skip for part in rel.parts[:-1]):
            continue
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[".".join([package, *parts])] = path
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``files`` it imports anywhere in its source (lazy imports included).

    An imported name resolves to the longest known module it starts with. Edges to the module's own
    parent packages are left out: Python imports those before the module itself in any case.
    """
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for name in imported_modules(path.read_text(), package):
            target = name
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != mod and not mod.startswith(target + "."):
                edges.add(target)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module
    (or a module importing itself), each sorted; Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph[v]:
                        found.append(sorted(comp))
    return found

"""Docs that must agree with the code: generated tables, the support matrix's method rows, and the
ledger of engine symbols the adapters import."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import overdrive
from overdrive.benchmarks import docs_tables
from overdrive.adapters import ADAPTERS

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("vllm", "sglang", "diffusers", "transformers")


def test_generated_tables_are_current():
    stale = docs_tables.sync(ROOT / "docs")
    assert not stale, f"stale generated docs tables {stale}: run `python -m overdrive.benchmarks.docs_tables --write`"


def test_generated_table_follows_the_catalogue(monkeypatch):
    """The generator reads the adapter catalogue: take a kind away and its cell becomes a dash."""
    first = ADAPTERS[0]
    kind = next(iter(first.kinds))
    text = docs_tables.kinds_table(detail=True)
    assert first.kinds[kind] in text
    import dataclasses

    smaller = dataclasses.replace(first, kinds={k: v for k, v in first.kinds.items() if k != kind})
    monkeypatch.setattr("overdrive.adapters.ADAPTERS", (smaller, *ADAPTERS[1:]))
    row = next(r for r in docs_tables.kinds_table(detail=True).splitlines() if r.startswith(f"| {kind.value} |"))
    assert row.split(" | ")[1] == "–"


def _method_rows(text: str) -> dict[str, dict[str, str]]:
    """First table after '## Methods': method name (first backticked word) -> column -> cell."""
    lines = text.split("## Methods", 1)[1].splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [[c.strip() for c in x.strip().strip("|").split("|")] for x in lines[start:end]]
    head = rows[0]
    return {re.match(r"`([^`]+)`", r[0]).group(1): dict(zip(head, r)) for r in rows[2:]}


def test_support_matrix_lists_every_builtin_method_where_its_kind_reaches():
    rows = _method_rows((ROOT / "docs" / "support-matrix.md").read_text())
    builtin = {s.name: s for s in overdrive.list_methods()}
    assert set(rows) == set(builtin), "docs/support-matrix.md must have one row per built-in method"
    names = {"vllm": "vLLM", "sglang": "SGLang", "diffusers": "Diffusers", "transformers": "transformers"}
    for name, spec in builtin.items():
        for a in ADAPTERS:
            cell = rows[name][names[a.framework]]
            served = spec.kind in a.kinds
            assert (not cell.startswith("–")) == served, f"support matrix: {name} x {a.framework} says {cell!r}"


LEDGER = ROOT / "docs" / "ledger.md"
#: a name inside a row's parenthesized member list must not be another module-level engine symbol
PACKAGES = re.compile(r"(vllm|sglang|diffusers|transformers|torch)\.")


def _ledger_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| symbol ")]


def ledger_symbol(cell: str) -> tuple[list[str], list[str]]:
    """(backticked names outside parentheses, backticked names inside them) of a ledger row's symbol cell.
    Parentheses inside backticks (`abort(id)`) do not count."""
    names = re.findall(r"`([^`]*)`", cell)
    outer, inner, depth = [], [], 0
    for i, part in enumerate(re.split(r"`[^`]*`", cell)):
        if i:
            (inner if depth else outer).append(names[i - 1])
        for ch in part:
            depth += {"(": 1, ")": -1}.get(ch, 0)
    return outer, inner


def test_ledger_symbol_rule_on_examples():
    assert ledger_symbol("`vllm.x.A` (`f(a, b)`, `g`)") == (["vllm.x.A"], ["f(a, b)", "g"])
    assert ledger_symbol("entry-point group `vllm.general_plugins`") == (["vllm.general_plugins"], [])
    assert ledger_symbol("`A`, `B`")[0] == ["A", "B"]                      # two symbols: refused below
    assert ledger_symbol("`A` (members) and `B`")[0] == ["A", "B"]
    assert PACKAGES.match(ledger_symbol("`A` (`vllm.y.B`)")[1][0])         # another symbol in the list


def test_every_ledger_row_names_one_symbol():
    """One row per engine symbol (docs/ledger.md states the rule): one backticked name outside
    parentheses; a parenthesized list holds that symbol's own members, never another module-level name."""
    bad = []
    for cells in _ledger_rows(LEDGER.read_text()):
        outer, inner = ledger_symbol(cells[0])
        if len(outer) != 1 or any(PACKAGES.match(n) for n in inner):
            bad.append(cells[0][:100])
    assert not bad, "ledger rows must name one symbol each (split them):\n" + "\n".join(bad)


def test_every_engine_symbol_an_adapter_imports_is_in_the_ledger():
    """Each engine name an adapter imports is the symbol of a ledger row (not only mentioned in prose)."""
    symbols = [ledger_symbol(cells[0])[0][0] for cells in _ledger_rows(LEDGER.read_text())
               if ledger_symbol(cells[0])[0]]
    missing = []
    for path in sorted(p for p in (ROOT / "adapters").rglob("*.py") if "tests" not in p.parts):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ENGINES:
                names = [(f"{node.module}.{a.name}", a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                names = [(a.name, a.name.split(".")[-1]) for a in node.names if a.name.split(".")[0] in ENGINES
                         and "." in a.name]
            else:
                continue
            missing += [f"{path.relative_to(ROOT)}: {full}" for full, name in names
                        if not any(re.search(rf"(^|\.){re.escape(name)}\b", s) for s in symbols)]
    assert not missing, "add rows to docs/ledger.md for: " + ", ".join(missing)


def test_every_ledger_entry_says_how_why_and_when_it_can_go():
    rows = _ledger_rows(LEDGER.read_text())
    assert len(rows) > 50
    bad = [" | ".join(r)[:80] for r in rows if len(r) != 5 or not all(r)]
    assert not bad, "ledger rows need symbol | how | why | kind | can go when (– where nothing is planned):\n" + \
        "\n".join(bad)


#: what a reader of the repository cannot follow: notes kept outside it, issue numbers of its tracker
OUTSIDE = re.compile("|".join((r"DESIGN" + r"\.md", r"KINDS" + r"\.md", r"shared/" + "research", r"/work" + "/",
                               r"\bissues? #?\d", r"\(#\d+\)")))


def test_docs_and_code_stand_alone():
    assert all(OUTSIDE.search(x) for x in ("see DESIGN" + ".md", "(KIN" + "DS.md: python 3.12)", "iss" + "ue 21",
                                           "its iss" + "ues #3/#18", "fixed (" + "#12)"))
    assert not any(OUTSIDE.search(x) for x in ("tissue 3", "an issue with 2 engines", "step #"))
    files = [ROOT / "README.md", ROOT / "run", *(ROOT / "docs").rglob("*.md")]
    for room in ("plugins", "adapters", "kernels", "integration_tests", "examples"):
        files += (ROOT / room).rglob("*.py")
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:90]}" for p in files
           for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, "references a reader of the repository cannot follow:\n" + "\n".join(bad)

"""Tables in docs/ that are generated from the code, so they cannot drift from it.

    python -m overdrive.benchmarks.docs_tables            # check: exit 1 and name every stale table
    python -m overdrive.benchmarks.docs_tables --write    # rewrite the generated blocks in place

A generated block sits between ``<!-- BEGIN generated:NAME ... -->`` and ``<!-- END generated:NAME -->``
in a Markdown file; everything outside the markers is written by hand. The kinds x frameworks tables
come from the adapter catalogue (:data:`overdrive.adapters.ADAPTERS`), not from what is installed.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from overdrive.kinds import Kind

DOCS = Path(__file__).resolve().parents[2] / "docs"


def kinds_table(detail: bool) -> str:
    """Kinds x frameworks: "yes"/"–" (``detail=False``) or how a method of the kind is reached."""
    from overdrive.adapters import ADAPTERS

    head = ["kind", *(a.framework for a in ADAPTERS)]
    rows = [head, ["---"] * len(head)]
    for kind in Kind:
        cells = [a.kinds.get(kind, "–") if detail else ("yes" if kind in a.kinds else "–") for a in ADAPTERS]
        rows.append([kind.value, *cells])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


#: block name -> (file under docs/, generator)
BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "kinds": ("architecture.md", lambda: kinds_table(detail=False)),
    "kind-surfaces": ("support-matrix.md", lambda: kinds_table(detail=True)),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- BEGIN generated:{re.escape(name)}\b[^>]*-->\n)(.*?)(<!-- END generated:{re.escape(name)} -->)",
                      re.S)


def sync(docs: Path = DOCS, write: bool = False) -> list[str]:
    """Names of stale (or missing) blocks as ``file: block``; with ``write`` the stale ones are rewritten."""
    from overdrive.config import atomic_write_text

    stale = []
    for name, (fname, make) in BLOCKS.items():
        path = docs / fname
        text = path.read_text()
        m = _pattern(name).search(text)
        if m is None:
            stale.append(f"{fname}: no block {name!r} (add <!-- BEGIN generated:{name} --> / <!-- END generated:{name} -->)")
            continue
        want = make().rstrip("\n") + "\n"
        if m.group(2) != want:
            stale.append(f"{fname}: {name}")
            if write:
                atomic_write_text(path, text[:m.start(2)] + want + text[m.end(2):])
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.docs_tables", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite stale generated blocks")
    args = ap.parse_args(argv)
    stale = sync(write=args.write)
    for s in stale:
        print(("rewrote " if args.write and "no block" not in s else "stale: ") + s)
    return 1 if stale and (not args.write or any("no block" in s for s in stale)) else 0


if __name__ == "__main__":
    sys.exit(main())

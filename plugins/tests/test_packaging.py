"""Every importable package folder is listed in pyproject.toml, so a wheel (not only an editable
install) ships it."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPING = {"plugins": "overdrive", "adapters": "overdrive.adapters", "kernels": "overdrive.kernels"}


def test_all_package_folders_are_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "tests" in rel:
                continue
            pkg = ".".join((name, *rel))
            if not any(pkg.startswith(f"{other}.") or pkg == other for other in MAPPING.values() if other != name
                       and other.startswith(name + ".")):
                found.add(pkg)
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"

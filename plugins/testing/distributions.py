"""Install a package as a real (metadata-visible) distribution into a folder, for plugin tests.

``importlib.metadata`` finds any ``NAME-VERSION.dist-info`` folder on ``sys.path``; writing one with
an ``entry_points.txt`` next to the package source makes that package discoverable through entry
points exactly as a pip-installed third-party plugin is (no network, no build). Add the folder to
``sys.path`` (in process) or ``PYTHONPATH`` (for engine subprocesses).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PLUGIN = REPO_ROOT / "examples" / "third_party_plugin"


def install_distribution(root: Path, name: str, version: str,
                         entry_points: Mapping[str, Mapping[str, str]],
                         packages: Mapping[str, Path | str] = ()) -> Path:
    """Write ``root/<pkg>`` (copied from a folder, or a module source string) and its dist-info."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for pkg, src in dict(packages).items():
        if isinstance(src, Path):
            shutil.copytree(src, root / pkg, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / f"{pkg}.py").write_text(src)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return root


def install_example_plugin(root: Path) -> Path:
    """examples/third_party_plugin as the installed distribution ``overdrive-example-plugin``."""
    return install_distribution(
        root, "overdrive-example-plugin", "0.1.0",
        {"overdrive.plugins": {"example": "overdrive_example.plugin"}},
        {"overdrive_example": EXAMPLE_PLUGIN / "overdrive_example"},
    )


def install_broken_plugin(root: Path) -> Path:
    """A distribution whose overdrive plugin fails to import (to test that the others still load)."""
    return install_distribution(
        root, "overdrive-broken-plugin", "0.0.1",
        {"overdrive.plugins": {"broken": "overdrive_broken_plugin"}},
        {"overdrive_broken_plugin": "raise ImportError('overdrive_broken_plugin needs a missing dependency')\n"},
    )

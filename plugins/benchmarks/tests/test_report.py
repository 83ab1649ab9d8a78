"""overdrive.benchmarks: the device/date/versions header of every benchmark report and its atomic write."""
from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os

import torch

from overdrive.benchmarks import header, package_versions, write_json


def test_header_names_the_device_date_and_installed_versions():
    h = header("demo", "cpu", rows=[1, 2])
    assert list(h)[:6] == ["benchmark", "date", "device", "commit", "python", "versions"] and h["rows"] == [1, 2]
    assert h["device"].startswith("CPU (") and f"{os.cpu_count()} cores" in h["device"]
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(h["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)
    assert h["versions"]["torch"] == md.version("torch") and torch.__version__.startswith(h["versions"]["torch"])
    assert None not in h["versions"].values()
    assert set(h["versions"]) <= set(package_versions())


def test_header_commit_is_this_checkout_or_the_environment(monkeypatch):
    import subprocess
    from pathlib import Path

    from overdrive.benchmarks import source_commit

    root = Path(__file__).resolve().parents[3]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    monkeypatch.setenv("OVERDRIVE_COMMIT", "")
    monkeypatch.delenv("OVERDRIVE_COMMIT")
    if head.returncode == 0:  # a git checkout: the commit, "+dirty" when tracked files differ
        assert source_commit().removesuffix("+dirty") == head.stdout.strip()
    monkeypatch.setenv("OVERDRIVE_COMMIT", "abc123")  # a tree copied without .git (the GPU machine)
    assert source_commit() == "abc123" and header("x", "cpu")["commit"] == "abc123"


def test_write_json_replaces_the_file_whole(tmp_path):
    p = tmp_path / "sub" / "r.json"
    write_json(p, {"a": 1})
    write_json(p, {"b": [1, 2]}, indent=1)
    assert json.loads(p.read_text()) == {"b": [1, 2]} and p.read_text().endswith("\n")
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]

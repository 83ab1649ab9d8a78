"""MethodConfig: validation on construction, JSON round-trip, version handling, atomic save."""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

import pytest

from overdrive import ConfigError, MethodConfig
from overdrive.config import atomic_write_text


@dataclasses.dataclass
class QCfg(MethodConfig):
    VERSION = 2
    bits: int = 4
    group_size: int | None = 128
    loss: Literal["mae", "mse"] = "mae"
    alpha: float = 0.5
    skip: list = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if self.bits not in (3, 4, 8):
            raise ConfigError(f"QCfg.bits must be 3, 4 or 8, got {self.bits}")


def test_round_trip_and_version_stamp(tmp_path):
    c = QCfg(bits=3, group_size=None, loss="mse", alpha=1, skip=["lm_head"])
    assert c.version == 2
    p = c.save(tmp_path / "c.json")
    assert QCfg.load(p) == c
    assert QCfg.from_json(c.to_json()) == c


@pytest.mark.parametrize("data,match", [
    ({"bits": 5}, "bits must be 3, 4 or 8"),
    ({"bits": "4"}, r"QCfg.bits must be int, got '4'"),
    ({"bits": True}, "QCfg.bits must be int"),
    ({"loss": "l1"}, "QCfg.loss must be"),
    ({"group_size": 1.5}, "QCfg.group_size must be"),
    ({"version": 3}, "version 3 is newer"),
    ({"bitz": 4}, r"unknown option\(s\) \['bitz'\]"),
])
def test_bad_values_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        QCfg.from_dict(data, source="plan.json")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: no such file"):
        QCfg.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        QCfg.load(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="arr.json: expected a JSON object"):
        QCfg.load(arr)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # temporary file removed

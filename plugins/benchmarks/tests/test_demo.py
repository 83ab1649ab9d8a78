"""The demo's step selection (``--only`` / ``--skip``), and one cheap step run end to end through ``--only``."""
from __future__ import annotations

import subprocess
import sys

import pytest

import overdrive
from overdrive.benchmarks import demo


def _names(argv: list[str]) -> list[str]:
    return [name for name, _ in demo.selected(demo.parse_args(argv))]


def test_only_is_repeatable_or_a_comma_list_and_keeps_the_demo_order():
    assert _names(["--only", "r2r,moa", "--only", " vgdfr "]) == ["moa", "vgdfr", "r2r"]
    assert _names(["--only", "mbq"]) == ["mbq"]
    assert _names([]) == [name for name, _ in demo.STEPS]
    assert _names(["--skip", "vllm", "mbq"]) == [n for n, _ in demo.STEPS if n not in ("vllm", "mbq")]
    assert _names(["--only", "moa,r2r", "--skip", "r2r"]) == ["moa"]


@pytest.mark.parametrize("argv", [["--only", "moa,nope"], ["--only", "Moa"], ["--skip", "nope"]])
def test_an_unknown_step_is_an_error_that_lists_the_known_ones(argv, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown step" in err and argv[1].split(",")[-1] in err
    assert "known steps: " + ", ".join(n for n, _ in demo.STEPS) in err


def test_every_step_has_a_runner_and_every_built_in_method_a_step():
    names = [n for n, _ in demo.STEPS]
    assert len(set(names)) == len(names)
    assert all(callable(getattr(demo.Demo, n, None)) for n in names)
    built_in = {s.name for s in overdrive.list_methods() if isinstance(s.impl, str) and s.impl.startswith("overdrive.")}
    assert built_in <= set(names), built_in - set(names)


@pytest.mark.slow
def test_only_runs_the_named_step_alone():
    r = subprocess.run([sys.executable, "-m", "overdrive.benchmarks.demo", "--only", "vgdfr"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.split("=== Summary")[1]
    assert summary.count("[ok]") == 1 and "VGDFR" in summary and "[FAIL]" not in summary
    assert "disable() restored bit-identical output" in summary

"""``overdrive serve-NAME`` exists for every routing method and refuses bad inputs before starting engines."""
from __future__ import annotations

import shutil

import pytest

from overdrive import cli
from overdrive.testing.r2r import tiny_r2r_pair, tiny_r2r_router
from overdrive.testing.tokenizer import save_tokenizer


def test_serve_command_is_contributed_per_routing_method():
    _, extra = cli.build_parser()
    assert "serve-r2r" in extra
    assert "r2r token routing" in extra["serve-r2r"].help


def _serve(capsys, *args: str) -> tuple[int, str]:
    """In process: these inputs must be refused before any engine (or the HTTP server) starts."""
    rc = cli.main(["serve-r2r", *args, "--port", "1"])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def pair_router():
    s, l = tiny_r2r_pair()
    return s, l, tiny_r2r_router()


def test_different_tokenizers_fail_at_startup_naming_both(tmp_path, pair_router, capsys):
    s, l, router = pair_router
    other = tmp_path / "large-other-tokenizer"
    shutil.copytree(l, other)
    save_tokenizer(other, vocab_size=400)
    rc, err = _serve(capsys, "--small", str(s), "--large", str(other), "--router", str(router))
    assert rc == 2, err[-2000:]
    assert "one tokenizer shared by both models" in err and str(other) in err and str(s) in err


def test_bad_threshold_and_router_folder_fail_at_startup(pair_router, capsys):
    s, l, router = pair_router
    rc, err = _serve(capsys, "--small", str(s), "--large", str(l), "--router", str(router), "--threshold", "1.5")
    assert rc == 2 and "--threshold 1.5" in err
    rc, err = _serve(capsys, "--small", str(s), "--large", str(l), "--router", str(s))
    assert rc == 2 and "not an R2R router folder" in err
    rc, err = _serve(capsys, "--small", str(s), "--large", str(s / "missing"), "--router", str(router))
    assert rc == 2 and "--large" in err and "not a directory" in err


def test_routes_are_named_after_the_method_not_r2r():
    from overdrive.adapters.vllm.routing.api import build_app

    paths = {r.path for r in build_app("other", "served-name").routes}
    assert {"/other/stats", "/health", "/v1/models", "/v1/completions", "/v1/chat/completions"} <= paths
    assert not any("r2r" in p for p in paths)

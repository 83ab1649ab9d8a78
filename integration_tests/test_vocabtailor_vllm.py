"""VocabTailor in a real vLLM server (one engine start-up) against transformers with the same profile.

Reference: transformers' ``generate()`` with ``overdrive.transformers.enable(model, "vocabtailor")`` (float32,
tested itself against the full model in float64 in plugins/vocabtailor/tests). The profile's static set is
small, so the allowed sets change the greedy tokens (checked: the full-vocabulary tokens differ), and the
prompts differ, so each request has its own set. Requests are sent so that vLLM batches them.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

import overdrive.transformers as odt
from overdrive.cli import main as cli_main
from overdrive.testing import tiny_llama
from overdrive.testing.probe import child_env, run_probe
from overdrive.testing.vllm_server import VllmServer

pytestmark = pytest.mark.slow

CORPUS = ["the quick brown fox jumps over the lazy dog", "the model answers questions about pictures",
          "one two three four five six", "the lazy dog sleeps; the quick fox answers"]
PROMPTS = ["hello world, this is a tiny model", "describe the video. a cat sits on a red mat near the window",
           "one two three"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("vt")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"output": t}) + "\n" for t in CORPUS))
    out = d / "profile.json"
    assert cli_main(["calibrate", "--method", "vocabtailor", "--model", str(tiny_llama()), "--corpus",
                     str(d / "corpus.jsonl"), "--output", str(out), "--min-doc-freq", "2", "--tolerance", "0.3"]) == 0
    return out


def transformers_tokens(profile, enable: bool) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).eval()
    if enable:
        odt.enable(model, "vocabtailor", profile=str(profile))
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        new = g[0, ids.shape[1]:].tolist()
        out.append(new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new)
    return out


@pytest.fixture(scope="module")
def served(profile, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "vllm.log"
    conf = json.dumps({"vocabtailor": {"profile": str(profile)}})
    with VllmServer(tiny_llama(), ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                                   "--additional-config", conf], log_path=log) as srv:
        staggered = srv.staggered_greedy_token_ids(PROMPTS, MAX_TOKENS, after=3)
        single = [srv.greedy_token_ids(p, MAX_TOKENS) for p in PROMPTS]
        # One request with every prompt and 32 tokens each (EOS ignored): the requests' decodes overlap
        # whatever the machine's speed, so the LM head certainly runs for a batch of more than one.
        srv.client().completions.create(model=srv.model, prompt=PROMPTS, max_tokens=32, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        text = srv.log_text()
    return staggered, single, text


def test_server_tokens_equal_transformers(profile, served):
    staggered, single, _ = served
    want = transformers_tokens(profile, enable=True)
    assert single == want
    assert staggered == want  # batched: the later prompts' prefills run with the first one's decodes
    assert transformers_tokens(profile, enable=False) != want  # the vocabulary restriction changed tokens


def test_server_reports_vocabulary_memory_and_compact_head(served):
    _, _, text = served
    m = re.search(r"overdrive vocabtailor: vocabulary components (\d+) bytes on the device \(two tables 512 x 128\); "
                  r"the LM head computes (\d+) resident rows \((\d+) bytes\)", text)
    assert m, text[-3000:]
    assert int(m.group(1)) == 2 * 512 * 128 * 4
    assert int(m.group(3)) == int(m.group(2)) * 128 * 4
    rows = [(int(a), int(b)) for a, b in re.findall(r"LM head over (\d+) of 512 rows for a batch of (\d+)", text)]
    assert rows and all(u < 512 for u, _ in rows) and max(b for _, b in rows) >= 2, rows


def test_profile_for_another_model_rejected_at_startup(profile, tmp_path):
    p = json.loads(profile.read_text())
    p["model"]["vocab_size"] = 1024
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(p))
    cases = [{"model": str(tiny_llama()), "additional_config": {"vocabtailor": {"profile": str(bad)}}},
             {"model": str(tiny_llama()), "additional_config": {"vocabtailor": {"profile": str(tmp_path / "no.json")}}},
             {"model": str(tiny_llama()), "additional_config": {"vocabtailor": {"profile": str(profile), "mode": "x"}}}]
    res = run_probe("overdrive.testing.vllm_engine_config", cases, env=child_env(engine=True),
                    timeout=900).result
    assert "was made for another model (vocab_size: profile 1024, model 512)" in res[0], res[0]
    assert "no.json: no such file" in res[1], res[1]
    assert "VocabTailorConfig.mode" in res[2], res[2]

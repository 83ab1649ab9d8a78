"""VocabTailor in transformers, on the tiny Llama fixture in float64.

References are independent of the adapter: the unmodified model's own logits (float64), with each
request's allowed set built here from Python sets (special ∪ static ∪ prompt tokens), and the
unmodified model's ``generate()`` with a logits processor written here that masks the complement.
"""
from __future__ import annotations

import json

import pytest
import torch

import overdrive.transformers as odt
from overdrive.cli import main as cli_main
from overdrive.config import ConfigError
from overdrive.testing import tiny_llama

transformers = pytest.importorskip("transformers")

CORPUS = ["the quick brown fox jumps over the lazy dog", "the model answers questions about pictures",
          "one two three four five six", "the lazy dog sleeps; the quick fox answers"]
PROMPTS = ["hello world, this is a tiny model", "describe the video. a cat sits on a red mat near the window"]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("vt")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"output": t}) + "\n" for t in CORPUS))
    out = d / "profile.json"
    assert cli_main(["calibrate", "--method", "vocabtailor", "--model", str(tiny_llama()), "--corpus",
                     str(d / "corpus.jsonl"), "--output", str(out), "--min-doc-freq", "2", "--tolerance", "0"]) == 0
    return out


def load(**overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llama(**overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return AutoTokenizer.from_pretrained(path), model


def allowed_sets(tok, profile, prompts_ids):
    p = json.loads(profile.read_text())
    return [sorted(set(p["special_ids"]) | set(p["static_ids"]) | set(ids)) for ids in prompts_ids]


def test_profile_contents(profile):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama())
    p = json.loads(profile.read_text())
    ids = [tok(t, add_special_tokens=False).input_ids for t in CORPUS]
    assert p["static_ids"] == sorted({t for d in ids for t in d})  # tolerance 0: every corpus token
    assert set(tok.all_special_ids) <= set(p["special_ids"]) and tok.eos_token_id in p["special_ids"]
    assert p["model"]["architecture"] == "LlamaForCausalLM" and p["model"]["vocab_size"] == len(tok.get_vocab())
    assert p["stats"]["documents"] == len(CORPUS)


def test_logits_equal_full_model_on_allowed_set(profile):
    tok, model = load()
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
    att = odt.enable(model, "vocabtailor", profile=str(profile))
    try:
        with torch.no_grad():
            got = model(**enc).logits
        prompts = [enc.input_ids[b][enc.attention_mask[b].bool()].tolist() for b in range(2)]
        sets = allowed_sets(tok, profile, prompts)
        assert sets[0] != sets[1]
        for b, s in enumerate(sets):
            mask = torch.zeros(ref.shape[-1], dtype=torch.bool)
            mask[s] = True
            torch.testing.assert_close(got[b][:, mask], ref[b][:, mask], rtol=1e-12, atol=1e-12)
            assert torch.isneginf(got[b][:, ~mask]).all()
        assert att.embedding.weight.device.type == "cpu"
        b = att.device_bytes()
        assert b["full"] == 2 * ref.shape[-1] * model.config.hidden_size * 8  # untied: two tables
    finally:
        assert odt.disable(model)


class MaskComplement:
    """Logits processor of the reference: -inf outside each row's allowed set."""

    def __init__(self, sets, vocab):
        self.mask = torch.zeros((len(sets), vocab), dtype=torch.bool)
        for b, s in enumerate(sets):
            self.mask[b, s] = True

    def __call__(self, input_ids, scores):
        return scores.masked_fill(~self.mask, float("-inf"))


@pytest.mark.parametrize("tied", [False, True])
def test_generate_equals_masked_full_generation(profile, tied):
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    tok, model = load(tie_word_embeddings=True) if tied else load()
    if tied:  # a tied model's LM head is its embedding: give it a bias too (the adapter must add it)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True, dtype=torch.float64)
        head.weight = model.get_input_embeddings().weight
        torch.nn.init.normal_(head.bias, std=2.0)
        model.set_output_embeddings(head)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    prompts = [enc.input_ids[b][enc.attention_mask[b].bool()].tolist() for b in range(2)]
    sets = allowed_sets(tok, profile, prompts)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    penalty = RepetitionPenaltyLogitsProcessor(50.0)
    with torch.no_grad():
        ref = model.generate(**enc, logits_processor=LogitsProcessorList([MaskComplement(sets, model.config.vocab_size),
                                                                          penalty]), **kw)
        ref_logits = model(**enc).logits
        ref_no_pen = model.generate(**enc, logits_processor=LogitsProcessorList(
            [MaskComplement(sets, model.config.vocab_size)]), **kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    odt.enable(model, "vocabtailor", profile=str(profile))
    try:
        with torch.no_grad():
            got = model.generate(**enc, logits_processor=LogitsProcessorList([penalty]), **kw)
            got_no_pen = model.generate(**enc, **kw)
    finally:
        odt.disable(model)
    assert got.tolist() == ref.tolist()
    assert got_no_pen.tolist() == ref_no_pen.tolist()
    assert ref.tolist() != ref_no_pen.tolist()  # the repetition penalty changed the tokens: it ran
    new = got[:, enc.input_ids.shape[1]:]
    for b in range(2):
        assert set(new[b].tolist()) <= set(sets[b])
    # exact restore: same modules, same tensors, same generation
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref_logits)


def test_wrong_model_rejected(profile, tmp_path):
    tok, model = load()
    p = json.loads(profile.read_text())
    p["model"]["tokenizer_hash"] = "0" * 16
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(p))
    with pytest.raises(ConfigError, match="made for another model.*tokenizer_hash"):
        odt.enable(model, "vocabtailor", profile=str(bad))
    assert odt.enabled(model) is None
    with pytest.raises(ConfigError, match="no such file"):
        odt.enable(model, "vocabtailor", profile=str(tmp_path / "missing.json"))


def test_calibrate_cli_errors(tmp_path, capsys):
    assert cli_main(["calibrate", "--method", "vocabtailor", "--model", str(tmp_path), "--corpus", "x.txt",
                     "--output", str(tmp_path / "p.json")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli_main(["calibrate", "--method", "vocabtailor", "--model", str(tiny_llama()), "--corpus",
                     str(tmp_path / "none.txt"), "--output", str(tmp_path / "p.json")]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_vocabulary_leaves_the_device(profile):
    """On an accelerator: the embedding table is in host memory, only the allowed rows are on the device,
    and the logits still equal the full model's on the allowed set (float32, same device)."""
    tok, model = load()
    model = model.float().cuda()
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        ref = model(**enc).logits
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    att = odt.enable(model, "vocabtailor", profile=str(profile))
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    try:
        with torch.no_grad():
            got = model(**enc).logits
        assert att.embedding.weight.device.type == "cpu" and att.head.base_weight.device.type == "cuda"
        v, d = ref.shape[-1], model.config.hidden_size
        # both tables (untied) left the device; the resident rows (and their ids) came on (allocator rounds to 512 B)
        resident = att.device_bytes()["resident_rows"] + att.head.base_ids.numel() * 8
        assert abs(freed - (2 * v * d * 4 - resident)) <= 2048, (freed, 2 * v * d * 4, resident)
        mask = torch.isfinite(got)
        torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)
        assert model.device.type == "cuda"
    finally:
        odt.disable(model)
    assert model.get_input_embeddings().weight.device.type == "cuda"

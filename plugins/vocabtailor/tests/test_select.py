"""VocabTailor's vocabulary arithmetic against hand-computed cases."""
from __future__ import annotations

import json

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.contracts.vocab import BatchVocab, VocabIdentity, tokenizer_hash
from overdrive.vocabtailor.calibrate import read_documents
from overdrive.vocabtailor.config import ProfileOptions, VocabProfile, VocabTailorConfig
from overdrive.vocabtailor.method import METHOD
from overdrive.vocabtailor.select import letter_scripts, static_set

IDENT = VocabIdentity("TinyForCausalLM", 20, "abc")


def test_static_set_doc_freq_and_tolerance():
    # token 5 in 3 docs, 6 in 2, 7 in 1 (4 times), 8 in 1 (once); special 0 never counted
    docs = [[0, 5, 6, 7, 7, 7, 7], [5, 6, 0], [5, 8]]
    # tokens: 5x3, 6x2, 7x4, 8x1 = 10 occurrences; min_df=2 drops 7 (4) and 8 (1)
    s = static_set(docs, [0], None, min_doc_freq=2, tolerance=0.0, scripts=None)
    assert s.ids == [5, 6, 7, 8]  # tolerance 0: every dropped token comes back
    s = static_set(docs, [0], None, min_doc_freq=2, tolerance=0.5, scripts=None)
    assert s.ids == [5, 6] and s.stats["discarded_mass"] == 0.5 and s.stats["tokens_removed_by_doc_freq"] == 2
    s = static_set(docs, [0], None, min_doc_freq=2, tolerance=0.2, scripts=None)  # 5/10 > 0.2: 7 (most frequent) back
    assert s.ids == [5, 6, 7] and s.stats["discarded_mass"] == 0.1 and s.stats["tokens_restored_by_tolerance"] == 1
    assert s.stats["documents"] == 3 and s.stats["tokens"] == 10


def test_script_filter():
    assert letter_scripts("Hello, 42!") == {"LATIN"}
    assert letter_scripts(" Привет") == {"CYRILLIC"}
    assert letter_scripts("日本") == {"CJK"}
    assert letter_scripts("…") == set()
    texts = {1: " the", 2: "日", 3: " of"}
    docs = [[1, 2, 3]] * 5 + [[1, 3]] * 5  # 2 is 5 of 25 occurrences
    s = static_set(docs, [], texts, min_doc_freq=1, tolerance=0.25, scripts=["latin"])
    assert s.ids == [1, 3] and s.stats["tokens_removed_by_script"] == 1
    with pytest.raises(ConfigError, match="script filter"):
        static_set(docs, [], texts, min_doc_freq=1, tolerance=0.1, scripts=["latin"])


def _profile(static=(3, 4), special=(0, 1)) -> VocabProfile:
    return VocabProfile(model=IDENT.to_dict(), special_ids=list(special), static_ids=list(static))


@pytest.mark.parametrize("mode, want", [("hybrid", [[0, 1, 3, 4, 9], [0, 1, 3, 4, 7]]),
                                        ("static", [[0, 1, 3, 4], [0, 1, 3, 4]]),
                                        ("dynamic", [[0, 1, 3, 9], [0, 1, 7]])])
def test_allowed_modes(mode, want):
    cfg = VocabTailorConfig(profile="x.json", mode=mode)
    got = METHOD.allowed(_profile(), cfg, [torch.tensor([9, 9, 3]), torch.tensor([7])])
    assert [g.tolist() for g in got] == want


def test_batch_vocab_scatter_matches_hand_built():
    bv = BatchVocab.from_allowed([torch.tensor([4, 1]), torch.tensor([1, 6])], vocab=8)
    assert bv.union.tolist() == [1, 4, 6]
    compact = torch.tensor([[10., 11., 12.], [20., 21., 22.]], dtype=torch.float64)
    inf = float("-inf")
    want = torch.tensor([[inf, 10, inf, inf, 11, inf, inf, inf], [inf, 20, inf, inf, inf, inf, 22, inf]],
                        dtype=torch.float64)
    assert torch.equal(bv.scatter(compact), want)
    assert torch.equal(bv.scatter(compact[:, None])[:, 0], want)  # (B, S, U)
    assert torch.equal(bv.full_mask(), want > inf)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        BatchVocab.from_allowed([torch.tensor([8])], vocab=8)


def test_profile_validation_and_identity():
    with pytest.raises(ConfigError, match="static_ids"):
        _profile(static=(4, 3))
    with pytest.raises(ConfigError, match="outside"):
        _profile(static=(25,))
    with pytest.raises(ConfigError, match="special_ids is empty"):
        _profile(special=())
    with pytest.raises(ConfigError, match="vocab_size: profile 20, model 30"):
        METHOD.check_model(_profile(), VocabIdentity("TinyForCausalLM", 30, "abc"))
    METHOD.check_model(_profile(), IDENT)
    assert tokenizer_hash({"a": 0, "b": 1}) == tokenizer_hash({"b": 1, "a": 0}) != tokenizer_hash({"a": 1, "b": 0})
    with pytest.raises(ConfigError, match="profile is required"):
        VocabTailorConfig()
    with pytest.raises(ConfigError, match="tolerance"):
        ProfileOptions(tolerance=1.5)


def test_build_profile_keeps_special_out_of_static():
    p = METHOD.build_profile([[0, 5, 6], [5, 6]], IDENT, [1, 0], lambda ids: ["a"] * len(ids),
                             ProfileOptions(min_doc_freq=2, tolerance=0.0))
    assert p.special_ids == [0, 1] and p.static_ids == [5, 6] and p.model == IDENT.to_dict()


def test_read_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"input": "q", "output": "first"}) + "\n\n"
                                      + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "b.txt").write_text("para one\nstill one\n\n\npara two\n")
    assert read_documents([tmp_path / "a.jsonl", tmp_path / "b.txt"]) == ["first", "second", "para one\nstill one",
                                                                          "para two"]
    (tmp_path / "c.jsonl").write_text('{"input": "q"}\n')
    with pytest.raises(ConfigError, match=r"c.jsonl:1: expected a JSON object with a string field"):
        read_documents([tmp_path / "c.jsonl"])
    with pytest.raises(ConfigError, match="no such file"):
        read_documents([tmp_path / "missing.txt"])

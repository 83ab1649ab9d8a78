"""The R2R label pipeline on the tiny pair, against independent computations (float64 step-by-step
forwards, transformers' own generate with sentence ends as stop tokens)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from overdrive.config import ConfigError
from overdrive.r2r.labels import (KIND_DIVERGENT, KIND_IDENTICAL, KIND_NEUTRAL, AgreementJudge, Divergence,
                                  LabelOptions, LabelSet, continue_both, label_pairs, sentence_end_ids)
from overdrive.testing.r2r import PROMPTS, tiny_r2r_pair

N_PROMPTS, ANSWER = 3, 16


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s, l = tiny_r2r_pair()
    small = AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32).eval()
    large = AutoModelForCausalLM.from_pretrained(l, dtype=torch.float32).eval()
    return small, large, AutoTokenizer.from_pretrained(s)


@pytest.fixture(scope="module")
def labelled(models):
    small, large, tok = models
    prompts = [tok(p).input_ids for p in PROMPTS[:N_PROMPTS]]
    opts = LabelOptions(topk=20, max_new_tokens=ANSWER, continuation_tokens=6)
    seen: list[Divergence] = []

    def judge(cases):
        seen.extend(cases)
        return AgreementJudge()(cases)

    return prompts, label_pairs(small, large, tok, prompts, opts, judge), seen


def test_answers_and_teacher_forcing_match_float64_step_by_step(models, labelled):
    small, large, tok = models
    prompts, data, _ = labelled
    small64 = copy.deepcopy(small).double()
    eos = tok.eos_token_id
    row = 0
    for i, p in enumerate(prompts):
        ref = large.generate(torch.tensor([p]), max_new_tokens=ANSWER, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(p):].tolist()
        rows = data.sample == i
        assert int(rows.sum()) == len(ref)
        for t in range(len(ref)):
            with torch.no_grad():
                out = small64(torch.tensor([p + ref[:t]]), output_hidden_states=True)
            logits, hidden = out.logits[0, -1], out.hidden_states[-1][0, -1]
            assert int(data.token[row]) == int(logits.argmax())
            torch.testing.assert_close(data.hidden[row].double(), hidden, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(data.topk_logits[row].double(), logits.topk(20).values, rtol=1e-4, atol=1e-4)
            identical = int(logits.argmax()) == ref[t]
            assert (int(data.kind[row]) == KIND_IDENTICAL) == identical
            row += 1
    assert row == len(data)


def test_mismatches_get_the_judges_labels(labelled):
    _, data, seen = labelled
    mism = data.kind != KIND_IDENTICAL
    assert int(mism.sum()) == len(seen) > 0
    verdicts = AgreementJudge()(seen)
    assert data.kind[mism].tolist() == [KIND_DIVERGENT if v else KIND_NEUTRAL for v in verdicts]
    assert torch.equal(data.label, (data.kind == KIND_DIVERGENT).long())


def test_continuations_match_transformers_generate(models, labelled):
    _, large, tok = models
    _, _, seen = labelled
    ends = sentence_end_ids(tok, ".!?\n", large.config.vocab_size)
    end_ids = torch.nonzero(ends).flatten().tolist()
    for case in seen[:6]:
        for first, cont in ((case.small_token, case.small_continuation), (case.large_token, case.large_continuation)):
            if ends[first]:
                assert cont == []
                continue
            ids = torch.tensor([case.context + [first]])
            ref = large.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=end_ids,
                                 pad_token_id=end_ids[0])[0, ids.shape[1]:].tolist()
            assert cont == ref
        with torch.no_grad():
            lp = torch.log_softmax(large(torch.tensor([case.context])).logits[0, -1].double(), -1)
        assert case.small_logprob == pytest.approx(float(lp[case.small_token]), abs=1e-4)
        assert case.large_logprob == pytest.approx(float(lp[case.large_token]), abs=1e-4)
        assert case.large_logprob >= case.small_logprob  # the large model's greedy token


def test_sentence_end_ids(models):
    _, _, tok = models
    ends = sentence_end_ids(tok, ".", 512)
    assert all(("." in tok.decode([i])) == bool(ends[i]) for i in range(len(tok)) if i != tok.eos_token_id)
    assert bool(ends[tok.eos_token_id])


def test_agreement_judge_closed_forms():
    def case(sc, lc, slp=-1.0, llp=-0.5):
        return Divergence([1], 2, 3, sc, lc, slp, llp)

    j = AgreementJudge()
    assert j([case([5, 6], [5, 6]), case([5, 6], [5, 7]), case([], [])]) == [0, 1, 0]
    m = AgreementJudge(margin=1.0)
    assert m([case([5], [5], -3.0, -1.0), case([5], [5], -1.5, -1.0)]) == [1, 0]
    assert math.isinf(AgreementJudge().margin)


def test_bad_judge_output_and_options_are_rejected(models):
    small, large, tok = models
    p = [tok(PROMPTS[0]).input_ids]
    with pytest.raises(ConfigError, match="judge returned"):
        label_pairs(small, large, tok, p, LabelOptions(topk=4, max_new_tokens=8, continuation_tokens=2),
                    judge=lambda cases: [2] * len(cases))
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        label_pairs(small, large, tok, p, LabelOptions(topk=10**6, max_new_tokens=4))
    with pytest.raises(ConfigError, match="must be positive"):
        LabelOptions(continuation_tokens=0)


def test_labels_file_round_trip(tmp_path, labelled):
    _, data, _ = labelled
    path = data.save(tmp_path / "labels.safetensors")
    back = LabelSet.load(path)
    for f in ("hidden", "topk_logits", "token", "label", "kind", "sample"):
        assert torch.equal(getattr(back, f), getattr(data, f))
    assert back.meta["continuation_tokens"] == 6 and back.counts() == data.counts()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not an R2R labels file"):
        LabelSet.load(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="no such labels file"):
        LabelSet.load(tmp_path / "missing.safetensors")

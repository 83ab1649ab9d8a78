"""FrameFusion in transformers (per-layer hooks) on the tiny Qwen2.5-VL and LLaVA-OneVision fixtures.

Reference: the *unreduced* model with the test's own hooks that mask the removed tokens out as keys
from the layer that removed them on (and, for merges, overwrite the run's first token with the run
mean computed independently in float64). Dropping a token's rows, rotary rows and mask rows - what the
adapter does - must give the same outputs as masking it out of a full-length forward, because kept
tokens keep their original positions; so this checks positions, masks and the per-layer KV caches
through prefill and decoding without reusing the adapter's code.
"""
from __future__ import annotations

import pytest
import torch

import overdrive.transformers as odt
from overdrive.config import ConfigError
from overdrive.testing import sample_video, tiny_llama, tiny_qwen2_vl
from overdrive.testing.framefusion import partly_static_video
from overdrive.testing.llava import tiny_llava_onevision

transformers = pytest.importorskip("transformers")

MSGS = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the video."}]}]
NEW = 5


def load(path, **kw):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def qwen():
    return load(tiny_qwen2_vl())


@pytest.fixture(scope="module")
def llava():
    return load(tiny_llava_onevision())


def video_inputs(proc, videos, texts=None):
    texts = texts or ["describe the video."] * len(videos)
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": t}]}],
                                        add_generation_prompt=True) for t in texts]
    proc.tokenizer.padding_side = "left"
    return proc(text=prompts, videos=list(videos), return_tensors="pt", padding=True)


def greedy(model, inputs, n=NEW):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.scores, 1), out.past_key_values


def layers_of(model):
    return model.model.language_model.layers


class MaskedReference:
    """Full-length forward where token j is masked out as a key from layer ``removed_at[j]`` on, and
    ``merges[layer]`` = {root: members} overwrite the root's row with the float64 mean at that layer."""

    def __init__(self, model, length: int, removed_at: dict[int, int], merges: dict[int, dict[int, list[int]]] | None = None):
        self.model, self.length, self.removed_at, self.merges = model, length, removed_at, merges or {}
        self.handles = [layer.register_forward_pre_hook(self.hook(i), with_kwargs=True)
                        for i, layer in enumerate(layers_of(model))]

    def hook(self, idx):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            q = hidden.shape[1]
            dead = torch.zeros(self.length, dtype=torch.bool)
            for j, layer in self.removed_at.items():
                if layer <= idx:
                    dead[j] = True
            if q > 1:  # prefill
                hidden = hidden.clone()
                for root, members in self.merges.get(idx, {}).items():
                    rows = hidden[0, [root, *members]].double()
                    hidden[0, root] = rows.mean(0).to(hidden.dtype)
                allowed = torch.ones(q, q, dtype=torch.bool).tril() & ~dead[None, :]
                allowed |= torch.eye(q, dtype=torch.bool)
            else:  # decoding: cache holds the full prompt + decoded tokens
                kv = kwargs["past_key_values"].get_seq_length(idx) + q
                allowed = torch.ones(q, kv, dtype=torch.bool)
                allowed[:, :self.length] = ~dead[None, :]
            kwargs = dict(kwargs, attention_mask=allowed[None, None])
            if args:
                return (hidden, *args[1:]), kwargs
            return args, dict(kwargs, hidden_states=hidden)
        return pre

    def close(self):
        for h in self.handles:
            h.remove()


def removed_at_from(att, length):
    """Layer at which each original token stopped being computed, from the attachment's record."""
    s = att.session
    out = {}
    for j in range(length):
        for layer in range(att.num_layers):
            if j not in set(s.kept[layer][0].tolist()):
                out[j] = layer
                break
    return out


def test_removing_the_hooks_restores_exact_outputs(qwen):
    proc, model = qwen
    inputs = video_inputs(proc, [partly_static_video(0, frames=16)])
    with torch.no_grad():
        before = model(**inputs).logits
    tok0, _, _ = greedy(model, inputs)
    odt.enable(model, "framefusion", cost=0.5)
    with torch.no_grad():
        during = model(**inputs).logits
    assert during.shape[1] < before.shape[1]  # really reduced
    assert odt.disable(model) and odt.enabled(model) is None and not odt.disable(model)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, before)
    assert torch.equal(greedy(model, inputs)[0], tok0)


def test_qwen_prune_only_matches_masked_reference_through_decoding(qwen):
    """No merges (similarity 1.0): layer 0 keeps all, layer 1 prunes p = 1 - (1.5 - 1) / 1 = 0.5 of
    the video tokens by the last token's attention (cost .75 over the fixture's 2 layers)."""
    proc, model = qwen
    inputs = video_inputs(proc, [sample_video(0, frames=16, size=112)])
    S = inputs["input_ids"].shape[1]
    att = odt.enable(model, "framefusion", cost=0.75, similarity_lower_bound=1.0)
    try:
        tokens, scores, cache = greedy(model, inputs)
        summary = att.summaries[-1][0]
        removed = removed_at_from(att, S)
    finally:
        odt.disable(model)
    assert summary["per_layer"] == [128, 64] and summary["merged"] == 0 and summary["cost"] == pytest.approx(0.75)
    # each layer's KV cache holds exactly its own tokens plus the decoded ones
    assert [cache.get_seq_length(i) for i in range(2)] == [S + NEW - 1, S - 64 + NEW - 1]
    assert set(removed.values()) == {1} and len(removed) == 64

    # the pruned set is the bottom half of the last token's attention at layer 1 (transformers' own
    # eager attention weights of the unreduced model)
    _, eager = load(tiny_qwen2_vl(), attn_implementation="eager")
    got = {}
    h = layers_of(eager)[1].self_attn.register_forward_hook(lambda m, a, out: got.update(w=out[1]))
    with torch.no_grad():
        eager(**inputs)
    h.remove()
    last = got["w"][0, :, -1].mean(0)
    vid = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().squeeze(-1)
    bottom = set(vid[last[vid].argsort()[:64]].tolist())
    assert bottom == set(removed)

    ref = MaskedReference(model, S, removed)
    try:
        ref_tokens, ref_scores, _ = greedy(model, inputs)
    finally:
        ref.close()
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=2e-4, rtol=1e-4)


def test_llava_capped_merge_matches_float64_merge_reference(llava):
    """cost .8 over 4 layers: layer 0 may remove round(.2 * 128) = 26 tokens; the static half of the
    video offers more candidates, so exactly the 26 most similar merge and the reduction ends."""
    proc, model = llava
    inputs = video_inputs(proc, [partly_static_video(1, frames=8)])
    S = inputs["input_ids"].shape[1]
    att = odt.enable(model, "framefusion", cost=0.8)
    try:
        tokens, scores, cache = greedy(model, inputs)
        summary = att.summaries[-1][0]
        removed = removed_at_from(att, S)
    finally:
        odt.disable(model)
    assert summary["per_layer"] == [102] * 4 and (summary["merged"], summary["pruned"]) == (26, 0)
    assert abs(summary["cost"] - 0.8) <= 0.5 / 128

    # independent float64 merge decision on the layer-0 input (the embeddings)
    cap = {}
    h = layers_of(model)[0].register_forward_pre_hook(lambda m, a, k: cap.update(h=(a[0] if a else k["hidden_states"])[0]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    vid = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().squeeze(-1)[:-1]  # last = newline
    x = cap["h"][vid].double()
    tpf = 16
    sims = torch.full((vid.numel(),), -2.0, dtype=torch.float64)
    for i in range(tpf, vid.numel()):
        sims[i] = x[i] @ x[i - tpf] / (x[i].norm() * x[i - tpf].norm())
    order = sims.argsort(descending=True)
    assert sims[order[25]] >= 0.6 and sims[order[25]] - sims[order[26]] > 1e-4  # a clear cut at 26
    merged = set(order[:26].tolist())
    assert {int(vid[i]) for i in merged} == set(removed) and set(removed.values()) == {0}
    groups: dict[int, list[int]] = {}
    for i in sorted(merged):
        root = i - tpf
        while root in merged:
            root -= tpf
        groups.setdefault(int(vid[root]), []).append(int(vid[i]))

    ref = MaskedReference(model, S, removed, {0: groups})
    try:
        ref_tokens, ref_scores, _ = greedy(model, inputs)
    finally:
        ref.close()
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("cost,similarity,stages", [
    (0.3, 0.9, "merge at layer 0, prune at layer 2"),
    (0.5, 0.9, "merge at layer 0, prune at layer 2"),
    (0.3, None, "merge at layers 0 and 1, the second capped"),  # the family default 0.6
])
def test_llava_full_framefusion_reaches_the_cost_and_decodes(llava, cost, similarity, stages):
    proc, model = llava
    inputs = video_inputs(proc, [partly_static_video(2, frames=8)])
    S = inputs["input_ids"].shape[1]
    att = odt.enable(model, "framefusion", cost=cost, similarity_lower_bound=similarity)
    try:
        tokens, _, cache = greedy(model, inputs, n=8)
    finally:
        odt.disable(model)
    s = att.summaries[-1][0]
    kinds = [e.split(": ")[1].split(" ")[0] for e in s["events"]]
    if similarity == 0.9:
        assert kinds == ["merge", "merge", "prune"] and s["merged"] > 0 and s["pruned"] > 0, s["events"]
    else:
        assert kinds == ["merge", "merge"] and "capped" in s["events"][-1] and s["pruned"] == 0, s["events"]
    assert abs(s["cost"] - cost) <= 0.5 / 128
    assert tokens.shape == (1, 8)
    text = S - 128
    assert [cache.get_seq_length(i) for i in range(4)] == [text + n + 7 for n in s["per_layer"]]


@pytest.mark.parametrize("texts", [None, ["describe the video.", "what happens in this image? a cat sits on a red mat"]],
                         ids=["same-length", "left-padded"])
def test_batch_samples_are_reduced_independently(qwen, texts):
    proc, model = qwen
    vids = [partly_static_video(3, frames=16), sample_video(4, frames=16, size=112)]
    texts = texts or ["describe the video."] * 2
    att = odt.enable(model, "framefusion", cost=0.6)
    try:
        batch = video_inputs(proc, vids, texts)
        with torch.no_grad():
            both = model(**batch).logits[:, -1]
        sb = att.summaries[-1]
        singles, ss = [], []
        for v, t in zip(vids, texts):
            with torch.no_grad():
                singles.append(model(**video_inputs(proc, [v], [t])).logits[0, -1])
            ss.append(att.summaries[-1][0])
        tokens, _, _ = greedy(model, batch)
        single_tokens = [greedy(model, video_inputs(proc, [v], [t]))[0][0] for v, t in zip(vids, texts)]
    finally:
        odt.disable(model)
    assert [x["per_layer"] for x in sb] == [x["per_layer"] for x in ss]
    assert sb[0]["per_layer"] != sb[1]["per_layer"]  # different reductions: padding slots inside the batch
    if texts[0] != texts[1]:
        assert (batch["attention_mask"] == 0).any()
    torch.testing.assert_close(both, torch.stack(singles), atol=1e-4, rtol=1e-4)
    assert tokens.tolist() == [t.tolist() for t in single_tokens]


def test_text_only_requests_are_untouched(qwen):
    proc, model = qwen
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello world, this is"}]}]
    inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    att = odt.enable(model, "framefusion")
    try:
        with torch.no_grad():
            during = model(**inputs).logits
    finally:
        odt.disable(model)
    assert torch.equal(before, during) and att.summaries == []


def test_unsupported_models_and_bad_options_fail_clearly(qwen):
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_llama())
    with pytest.raises(TypeError, match="supported: LlavaOnevisionForConditionalGeneration, Qwen2VLFor"):
        odt.enable(llm, "framefusion")
    _, model = qwen
    with pytest.raises(ConfigError, match="cost must be in"):
        odt.enable(model, "framefusion", cost=0.0)
    with pytest.raises(ConfigError, match="similarity_lower_bound"):
        odt.enable(model, "framefusion", similarity_lower_bound=-0.5)
    assert odt.enabled(model) is None
    att = odt.enable(model, "framefusion")
    try:
        assert att.cfg.similarity_lower_bound == 0.5  # the Qwen2-VL family default
        with pytest.raises(RuntimeError, match="already enabled"):
            odt.enable(model, "framefusion")
    finally:
        odt.disable(model)

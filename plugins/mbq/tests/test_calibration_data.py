"""MBQ/AWQ calibration on real-model-shaped inputs: text data, chat templates that take only strings,
batched chunks, 16-bit checkpoints, the enclosing-module loss, and the CLI's one-line errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from overdrive import ConfigError, cli
from overdrive.adapters.transformers.calibration import decoder_layers as _decoder_layers
from overdrive.contracts.llm_calibration import Recording, load_for_calibration
from overdrive.mbq.calibrate import calibrate as _calibrate
from overdrive.mbq.calibrate import layer_groups, search_group_on_module
from overdrive.mbq.quant import fake_quant_weight
from overdrive.mbq.config import MBQConfig
from overdrive.mbq.data import build_samples, load_records, text_samples
from overdrive.testing import tiny_llama

#: a plain ChatML template that concatenates ``content`` as a string (fails on a list of parts)
STRING_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEXT = ("the quick brown fox jumps over the lazy dog. hello world, this is a tiny model built for tests. "
        "the model answers questions about pictures and videos in short sentences. ")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama())


@pytest.mark.parametrize("template", ["string-only", None])
def test_pairs_render_with_string_only_or_missing_chat_templates(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = STRING_ONLY_TEMPLATE if template else None
    rec = {"image": None, "prompt": "what is shown here?", "answer": "a cat sits on a mat"}
    if template:  # the bug: a list of parts reaches `+` in the template
        with pytest.raises(TypeError):
            t.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False)
    (smp,) = build_samples(t, [rec], [])
    ids = smp.inputs["input_ids"][0]
    if template:
        want_prefix = "<|im_start|>user\nwhat is shown here?<|im_end|>\n<|im_start|>assistant\n"
        want_answer = "a cat sits on a mat<|im_end|>\n"
    else:  # no template: "prompt\n" + answer
        want_prefix, want_answer = "what is shown here?\n", "a cat sits on a mat"
    assert t.decode(ids[~smp.caption_mask]) == want_prefix
    assert t.decode(ids[smp.caption_mask]) == want_answer
    assert not smp.vision_mask.any()


def test_text_chunks_are_the_concatenated_token_stream(tok):
    texts = [TEXT * 3, "", TEXT * 2]
    stream = []
    for t in texts:
        if t:
            stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    samples = text_samples(tok, texts, n_samples=5, seq_len=16, batch=2)
    assert [tuple(s.inputs["input_ids"].shape) for s in samples] == [(2, 16), (2, 16), (1, 16)]
    got = torch.cat([s.inputs["input_ids"] for s in samples]).reshape(-1).tolist()
    assert got == stream[:80]
    assert all(s.caption_mask.all() and not s.vision_mask.any() for s in samples)
    assert all(s.caption_mask.shape == s.inputs["input_ids"].shape for s in samples)
    # short text: every full chunk, and an error below one chunk
    n_full = len(stream) // 64
    assert sum(s.inputs["input_ids"].shape[0] for s in text_samples(tok, texts, 1000, 64)) == n_full
    with pytest.raises(ConfigError, match="fewer than one --seq-len chunk of 100000"):
        text_samples(tok, texts, 4, 100000)


def test_records_from_txt_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    assert load_records(tmp_path) == [{"text": "first document"}, {"text": "second document"}]
    assert load_records(tmp_path / "a.txt") == [{"text": "first document"}]
    j = tmp_path / "data.jsonl"
    j.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    assert load_records(j) == [{"text": "plain"}, {"image": None, "prompt": "p", "answer": "a"}]
    j.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ConfigError, match=r"data.jsonl:1: 'text' must be a string"):
        load_records(j)
    j.write_text(json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"data.jsonl:1: expected an object with a string 'text'"):
        load_records(j)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no \\*.txt calibration files"):
        load_records(empty)


def decoder_layers(model):
    return _decoder_layers(model)[1]


def calibrate(model, samples, cfg, **kw):
    """The pipeline on a model object (the layer wraps it; blocks are searched in float32 on the CPU)."""
    run = load_for_calibration(model, device="cpu", compute_dtype=torch.float32)
    try:
        return _calibrate(run, samples, cfg, **kw)
    finally:
        run.close()


def _record(module, rec):
    def pre(_m, args, kwargs):
        rec.calls.append((args, dict(kwargs)))
        rec.inputs.append(args[0] if args else kwargs["hidden_states"])

    def post(_m, _args, _kwargs, out):
        rec.outputs.append((out[0] if isinstance(out, tuple) else out).detach())

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True)]


def _llama(dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=dtype).eval()


def test_batched_text_chunks_calibrate_like_one_chunk_per_sample(tok):
    texts = [TEXT * 6]
    cfg = MBQConfig(bits=3, group_size=64, baseline="awq")
    models, results = [], []
    for batch in (4, 1):
        m = _llama()
        results.append(calibrate(m, text_samples(tok, texts, 4, 24, batch=batch), cfg))
        models.append(m)
    assert [(r.layer, r.group, r.rho) for r in results[0]] == [(r.layer, r.group, r.rho) for r in results[1]]
    for (n, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_sixteen_bit_model_is_searched_block_by_block_and_keeps_its_dtype(tok):
    m = _llama(torch.bfloat16)
    samples = text_samples(tok, [TEXT * 6], 4, 24)
    results = calibrate(m, samples, MBQConfig(bits=4, group_size=64, baseline="awq"))
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(r.loss <= r.rtn_loss + 1e-12 for r in results)
    with torch.no_grad():
        assert torch.isfinite(m(**samples[0].inputs).logits).all()


@pytest.mark.parametrize("act_bits,bits", [(16, 3), (8, 4)])
def test_module_loss_equals_a_float64_mlp_with_quantized_gate_and_up(tok, act_bits, bits):
    """gate,up scales judged on the MLP output: each grid point's loss equals an independent float64
    evaluation of down(silu(gate' x') * up' x') with W' = Q(W s) / s (and x' = Qa(x / s) s for A8)."""
    from overdrive.mbq import calibrate as cal
    from overdrive.mbq.quant import fake_quant_act

    m = _llama()
    layer = decoder_layers(m)[1]
    grp = [g for g in layer_groups(layer) if g.name == "gate_up"][0]
    rec = Recording()
    hs = _record(layer.mlp, rec)
    samples = text_samples(tok, [TEXT * 6], 3, 20)
    with torch.no_grad():
        for s in samples:
            m(**s.inputs)
    for h in hs:
        h.remove()
    cfg = MBQConfig(bits=bits, group_size=64, act_bits=act_bits, baseline="awq")
    tok_w = torch.rand(60, generator=torch.Generator().manual_seed(1))
    x = rec.input_rows().double()
    mlp = layer.mlp
    w = {n: getattr(mlp, n).weight.detach().double() for n in ("gate_proj", "up_proj", "down_proj")}
    ref = torch.nn.functional.linear(torch.nn.functional.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T),
                                     w["down_proj"])

    def independent(rho: float) -> float:
        xm = x.abs().mean(0).clamp_min(1e-6).float()
        s = xm.pow(rho)
        s = (s / (s.max() * s.min()).sqrt()).double()
        xin = fake_quant_act((x / s).float()).double() * s if act_bits == 8 else x
        q = {n: fake_quant_weight((w[n] * s).float(), cfg).double() / s for n in ("gate_proj", "up_proj")}
        out = (torch.nn.functional.silu(xin @ q["gate_proj"].T) * (xin @ q["up_proj"].T)) @ w["down_proj"].T
        return float(((out - ref).abs().mean(-1) * tok_w).sum() / tok_w.sum())

    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    s, rho, loss, rtn_loss = search_group_on_module(grp, mlp, rec, tok_w, cfg, "mae")
    assert rho in cal.GRID and loss <= rtn_loss
    assert loss == pytest.approx(independent(rho), rel=1e-3, abs=1e-7)
    assert rtn_loss == pytest.approx(independent(0.0), rel=1e-3, abs=1e-7)
    assert loss <= min(independent(r) for r in cal.GRID) * (1 + 1e-3) + 1e-7
    for n, p in mlp.named_parameters():  # the search restores the weights (folding is the caller's job)
        assert torch.equal(p, before[n]), n


def test_cli_config_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    model = tiny_llama(hidden_size=96, intermediate_size=192)  # K = 96 and 192: group 128 divides neither
    out = tmp_path / "out"
    capsys.readouterr()  # building the fixture may print progress
    rc = cli.main(["quantize", "--method", "mbq", "--model", str(model), "--output", str(out), "--bits", "4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("overdrive quantize: error: --group-size 128 does not divide the ")
    assert "group sizes that divide every layer's input features (96, 192): 32, 96" in err
    assert list(tmp_path.iterdir()) == []
    rc = cli.main(["quantize", "--method", "mbq", "--model", str(model), "--output", str(out), "--bits", "4",
                   "--group-size", "48"])
    assert rc == 2 and "MBQConfig.group_size must be a positive multiple of 32" in capsys.readouterr().err
    rc = cli.main(["quantize", "--method", "mbq", "--model", str(model), "--output", str(out), "--bits", "4",
                   "--group-size", "32", "--calib-data", str(tmp_path / "none.jsonl")])
    assert rc == 2 and "none.jsonl: calibration data file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_calibrates_on_text_with_a_string_only_template(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama().iterdir():
        if f.is_file():
            (src / f.name).write_bytes(f.read_bytes())
    conf = json.loads((src / "tokenizer_config.json").read_text())
    conf["chat_template"] = STRING_ONLY_TEMPLATE
    (src / "tokenizer_config.json").write_text(json.dumps(conf))
    (src / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": TEXT * 2}) for _ in range(3)) + "\n"
                    + json.dumps({"prompt": "describe the scene.", "answer": "a cat sits on a mat"}) + "\n")
    out = tmp_path / "q"
    rc = cli.main(["quantize", "--method", "mbq", "--model", str(src), "--output", str(out), "--bits", "4",
                   "--group-size", "64", "--baseline", "awq", "--calib-data", str(data), "--samples", "3",
                   "--seq-len", "32"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["baseline"] == "awq"


def test_search_subset_spreads_whole_sequences_over_the_calls():
    from overdrive.contracts.llm_calibration import BlockCall
    from overdrive.mbq.calibrate import search_subset

    calls = [BlockCall(torch.zeros(4, 32, 8), {}), BlockCall(torch.zeros(4, 32, 8), {})]
    assert search_subset(calls, 0) is None and search_subset(calls, 256) is None  # every token fits
    assert search_subset(calls, 64) == [(0, [0]), (1, [0])]  # 2 of 8 sequences: the 1st and the 5th
    assert search_subset(calls, 128) == [(0, [0, 2]), (1, [0, 2])]
    assert search_subset(calls, 1) == [(0, [0])]


def test_search_token_cap_above_the_data_changes_nothing_and_below_it_still_beats_rtn(tok):
    samples = text_samples(tok, [TEXT * 6], 8, 24, batch=4)
    cfg = MBQConfig(bits=3, group_size=64, baseline="awq")
    exact, capped_above, capped = _llama(), _llama(), _llama()
    r_exact = calibrate(exact, samples, cfg, search_tokens=0)
    r_above = calibrate(capped_above, samples, cfg, search_tokens=8 * 24)
    assert [(r.group, r.rho, r.loss) for r in r_exact] == [(r.group, r.rho, r.loss) for r in r_above]
    for (n, a), (_, b) in zip(exact.state_dict().items(), capped_above.state_dict().items()):
        assert torch.equal(a, b), n
    r_capped = calibrate(capped, samples, cfg, search_tokens=48)  # 2 of the 8 sequences judge the grid
    assert len(r_capped) == len(r_exact) and all(r.loss <= r.rtn_loss + 1e-12 for r in r_capped)
    with torch.no_grad():
        assert torch.isfinite(capped(**samples[0].inputs).logits).all()

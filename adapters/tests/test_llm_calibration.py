"""The LLM calibration layer (transformers) against the whole model run by transformers itself: block-wise
forward = the model's logits, block-wise backward = autograd through the whole model, at most one block
onloaded at a time, propagation options, and ``--device cuda`` without CUDA on every LLM calibration command."""
from __future__ import annotations

import pytest
import torch

from overdrive.contracts.llm_calibration import check_device, load_for_calibration
from overdrive.testing import tiny_llama


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).eval()


def _ids(b=2, n=24, seed=0):
    return torch.randint(3, 200, (b, n), generator=torch.Generator().manual_seed(seed))


def test_blockwise_forward_equals_the_model(model):
    batches = [{"input_ids": _ids(seed=0)}, {"input_ids": _ids(b=1, n=17, seed=1)}]
    with torch.no_grad():
        want = [model(**b, use_cache=False).logits for b in batches]
    with load_for_calibration(model, device="cpu") as run:
        got = run.forward(batches)
        tail = run.forward(batches, logits=slice(-3, None))
    for g, w, t in zip(got, want, tail):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t, w[:, -3:], rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored on close


def test_blockwise_backward_equals_autograd_through_the_whole_model(model):
    ids = _ids(seed=2)
    # reference: transformers' own forward and autograd, gradients of every o_proj / down_proj output and of K
    outs: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(("o", i), o)))
        hooks.append(layer.mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(("down", i), o)))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
    for h in hooks:
        h.remove()
    keys = list(outs)
    want = dict(zip(keys, torch.autograd.grad(loss, [outs[k] for k in keys])))

    got: dict[tuple[str, int], torch.Tensor] = {}
    order = []

    def visit(block, j, retained):
        order.append(block.index)
        for role, (_out, g) in retained.items():
            got[(role, block.index)] = g

    def lm_loss(logits, j):
        lg = logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))

    with load_for_calibration(model, device="cpu") as run:
        losses = run.backward([{"input_ids": ids}], lm_loss, retain=("o", "down"), visit=visit)
    assert losses[0] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert order == list(reversed(range(len(model.model.layers))))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=str(k))
    assert all(p.grad is None for p in model.parameters())


def test_one_block_onloaded_at_a_time():
    """Weights stored in bfloat16, blocks computed in float32: the float32 blocks are the onloaded ones."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.bfloat16).eval()
    block_bytes = sum(p.numel() * 4 for p in m.model.layers[0].parameters())
    seen = []

    def resident():
        return [i for i, layer in enumerate(m.model.layers) if next(layer.parameters()).dtype == torch.float32]

    batches = [{"input_ids": _ids(seed=3)}]
    with load_for_calibration(m, device="cpu", compute_dtype=torch.float32) as run:
        for block in run.blocks(batches):
            seen.append(resident())
            assert run.onloader.resident == block_bytes
        assert resident() == []
        run.backward(batches, lambda lg, j: lg.float().mean(), visit=lambda b, j, r: seen.append(resident()))
        assert run.onloader.peak == block_bytes and run.onloader.max_blocks == 1
    assert seen == [[0], [1], [1], [0]]
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_propagation_calibrated_original_and_set_outputs(model):
    import copy

    m = copy.deepcopy(model)
    batches = [{"input_ids": _ids(seed=4)}]

    def second_block_inputs(propagate, change):
        seen = []
        with load_for_calibration(copy.deepcopy(m), device="cpu") as run:
            for block in run.blocks(batches, propagate=propagate):
                if block.index == 0:
                    float_out = block.run()[0]
                    change(block, float_out)
                else:
                    seen.append(block.calls()[0].hidden)
        return seen[0], float_out

    def zero_o(block, _out):
        with torch.no_grad():
            block.roles["o"].weight.zero_()

    calibrated, ref = second_block_inputs("calibrated", zero_o)
    original, _ = second_block_inputs("original", zero_o)
    torch.testing.assert_close(original, ref)
    assert not torch.allclose(calibrated, ref, atol=1e-3)
    manual, _ = second_block_inputs("calibrated", lambda block, out: block.set_outputs([out * 2]))
    torch.testing.assert_close(manual, ref * 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("argv", [
    ["quantize", "--method", "mbq", "--baseline", "awq"],
    ["calibrate", "--method", "pmkvq", "--budget", "1MiB", "--max-len", "256"],
    ["calibrate", "--method", "moa"],
    ["calibrate", "--method", "r2r", "--large", "{model}"],
])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(argv, tmp_path, capsys):
    from overdrive import cli

    model = str(tiny_llama())
    out = tmp_path / "out"
    args = [a.replace("{model}", model) for a in argv]
    args += ["--small" if "r2r" in argv else "--model", model, "--output", str(out / "x.json"), "--device", "cuda"]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "--device cuda" in err
    assert not out.exists()


def test_default_device():
    assert check_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device("cpu") == "cpu"

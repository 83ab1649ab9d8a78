"""MxMoE's sensitivity against the real block: the MoE block's output error with one expert linear
quantized, measured by running transformers' block; and the CLI end to end."""
import json
import subprocess
import sys

import pytest
import torch

from overdrive.mxmoe.config import LINEARS, parse_format
from overdrive.mxmoe.costs import CostTable
from overdrive.testing.moe import tiny_moe


@pytest.fixture
def one_thread():
    # tiny matmuls: on a shared 2-core machine, intra-op threads only spin
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sensitivity_equals_the_block_output_error_of_one_quantized_linear(one_thread):
    from transformers import AutoModelForCausalLM

    from overdrive.adapters.transformers.moe_quant import moe_view
    from overdrive.mxmoe.calibrate import calibrate_layer
    from overdrive.mxmoe.quant import quantize_weight

    model = AutoModelForCausalLM.from_pretrained(tiny_moe("mixtral"), dtype=torch.float64,
                                                 experts_implementation="eager").eval()
    layer = model.model.layers[0]
    view = moe_view(layer, model.config)
    x = torch.randn(48, view.hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cands = ["w2g32", "w4g32", "w8a8"]
    res = calibrate_layer(view, x, 0, cands, "rtn", avg_bits=4.3, r=1.0,
                          costs=CostTable("cpu", torch.float32, reps=1, cache=False), batch_tokens=48)
    assert sum(res.frequency) == 48 * view.top_k
    block = layer.mlp
    with torch.no_grad():
        y0 = block(x[None])[0]
        ex = block.experts
        i = view.intermediate
        checked = 0
        for e in range(view.num_experts):
            if res.frequency[e] == 0:
                continue
            for li, lin in enumerate(LINEARS):
                for ci, c in enumerate(cands):
                    f = parse_format(c)
                    if not f.weight_only:
                        continue  # the block cannot quantize activations; weight-only formats suffice here
                    saved = (ex.gate_up_proj.clone(), ex.down_proj.clone())
                    w = view.weight(e, lin).clone()
                    wq = quantize_weight(w, f, "rtn")[1].double()
                    if lin == "gate":
                        ex.gate_up_proj[e, :i] = wq
                    elif lin == "up":
                        ex.gate_up_proj[e, i:] = wq
                    else:
                        ex.down_proj[e] = wq
                    err = float(((block(x[None])[0] - y0) ** 2).sum())
                    ex.gate_up_proj.copy_(saved[0]), ex.down_proj.copy_(saved[1])
                    assert res.loss[e * 3 + li, ci] == pytest.approx(err, rel=1e-6)
                    checked += 1
    assert checked >= 12
    # more bits, less error, for every routed block
    assert (res.loss[:, 1] < res.loss[:, 0]).sum() >= 0.9 * res.loss.shape[0]
    assert res.choice.avg_bits <= 4.3 + 1e-9


@pytest.mark.slow
def test_cli_calibrates_gptq_and_the_checkpoint_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    import overdrive.transformers  # noqa: F401

    src = tiny_moe("qwen3_moe")
    out = tmp_path / "mx"
    r = subprocess.run([sys.executable, "-m", "overdrive.cli", "quantize", "--method", "mxmoe", "--model", str(src),
                        "--output", str(out), "--avg-bits", "3.25", "--candidates", "w2g32,w3g64,w4g32,w8a8",
                        "--samples", "2", "--seq-len", "64", "--device", "cpu"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mxmoe" and qc["quantizer"] == "gptq"
    report = json.loads((out / "mxmoe_plan.json").read_text())
    for layer in report["layers"]:
        assert layer["avg_bits"] <= 3.25 + 1e-9 and layer["pareto"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.model.layers[0].mlp.experts.runtime is not None


def test_cli_rejects_bad_options_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "overdrive.cli", "quantize", "--method", "mxmoe", "--model",
                        str(tiny_moe("mixtral")), "--output", str(tmp_path / "o"), "--avg-bits", "3",
                        "--candidates", "w5g32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "unknown format 'w5g32'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()

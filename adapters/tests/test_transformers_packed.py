"""transformers + overdrive's quantizer on CPU in bfloat16: MBQ layers run torch's packed CPU GEMMs
(int4pack for W4 and W3 at 4 bits per weight, int8pack for W8A8) and the model's logits match a float64
model whose linear weights are the checkpoint's dequantized weights, within bf16 rounding."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from overdrive.kernels import cpu_packed

pytestmark = pytest.mark.skipif(not cpu_packed.int4pack_available(), reason="torch without packed CPU GEMMs")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from overdrive.mbq.config import MBQConfig
    from overdrive.mbq.quantize import quantize
    from overdrive.testing import tiny_llama

    root = tmp_path_factory.mktemp("packed")
    made = {}

    def get(bits, act_bits=16):
        if (bits, act_bits) not in made:
            kw = dict(bits=bits, group_size=64) if act_bits == 16 else dict(bits=bits, act_bits=8)
            made[bits, act_bits] = quantize(tiny_llama(), root / f"w{bits}a{act_bits}", MBQConfig(baseline="rtn", **kw))
        return made[bits, act_bits]

    return get


def _float64_reference(ckpt, bits, act_bits):
    """The unquantized architecture in float64 with every quantized linear's weight dequantized from the
    checkpoint (W3/W4: (code - zero) * scale; W8A8 needs activation quantization: not a plain linear)."""
    from transformers import AutoModelForCausalLM

    from overdrive.kernels import dequantize_reference
    from overdrive.testing import tiny_llama

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float64)
    sd = load_file(ckpt / "model.safetensors")
    for name, mod in model.named_modules():
        if f"{name}.qweight" in sd:
            k = mod.in_features
            w = dequantize_reference(sd[f"{name}.qweight"], sd[f"{name}.scales"].double(), sd[f"{name}.zeros"], bits,
                                     64, k)
            mod.weight.data = w.to(torch.float64)
    return model.eval()


@pytest.mark.parametrize("bits", [4, 3])
def test_bf16_model_runs_int4pack_and_matches_float64(checkpoints, bits, monkeypatch):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "auto")
    from transformers import AutoModelForCausalLM

    import overdrive.transformers  # noqa: F401  (registers the quantizer)

    ckpt = checkpoints(bits)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    layers = [m for m in model.modules() if type(m).__name__ == "OverdriveLinear"]
    assert layers and all(m.param_names == ("int4pack", "int4pack_sz") for m in layers)
    for m in layers:  # 4 bits per weight (W3 included), not a dequantized copy
        assert m.int4pack.dtype == torch.uint8 and m.int4pack.numel() * 2 == m.in_features * m.out_features
    ref = _float64_reference(ckpt, bits, 16)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])
    with torch.no_grad():
        got = model(ids).logits.double()
        want = ref(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 0.03 * want.abs().max().item(), (err, want.abs().max().item())


def test_bf16_w8a8_runs_int8pack(checkpoints, monkeypatch):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "auto")
    from transformers import AutoModelForCausalLM

    import overdrive.transformers  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(checkpoints(8, 8), dtype=torch.bfloat16).eval()
    layers = [m for m in model.modules() if type(m).__name__ == "OverdriveLinear"]
    assert layers and all(m.param_names == ("int8pack", "int8pack_scales") for m in layers)
    assert all(m.int8pack.dtype == torch.int8 for m in layers)
    # the same checkpoint on the float64-exact reference kernel (OVERDRIVE_KERNELS=torch), float32
    monkeypatch.setenv("OVERDRIVE_KERNELS", "torch")
    ref = AutoModelForCausalLM.from_pretrained(checkpoints(8, 8), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])
    with torch.no_grad():
        got, want = model(ids).logits.double(), ref(ids).logits.double()
    assert (got - want).abs().max().item() <= 0.03 * want.abs().max().item()

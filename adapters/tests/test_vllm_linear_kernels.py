"""MBQ layers handed to vLLM's own linear kernels: the selection against vLLM's real kernel registry with this
CPU's capability faked both ways, the load-time repack equal to the compressed-tensors export's tensors, and
vLLM's CPU int8 kernel run on a handed-off layer against a float64 reference. No engine is started."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm")

from overdrive.contracts import StandardWeight, WeightFormat  # noqa: E402
from overdrive.kernels.cpu_packed import CpuFeatures  # noqa: E402

lk = pytest.importorskip("overdrive.adapters.vllm.linear_kernels")

W4 = WeightFormat(4, 64, zero_point=True)
W3 = WeightFormat(3, 64, zero_point=True)
W8A8 = WeightFormat(8, None, zero_point=False, act_bits=8)
W4A8 = WeightFormat(4, None, zero_point=False, act_bits=8)
SHAPE = ((576, 1536), (576, 1536))
AVX2 = CpuFeatures("AVX2", avx512=False, avx512_bf16=False, vnni=False, amx=False)
AVX512 = CpuFeatures("AVX512", avx512=True, avx512_bf16=True, vnni=True, amx=False)


def _op(present: bool):
    return lambda name: present


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv(lk.ENV, raising=False)
    # vLLM's parameter classes ask the tensor-parallel group for rank/size (an engine process sets it up)
    import vllm.model_executor.parameter as vp

    monkeypatch.setattr(vp, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vp, "get_tensor_model_parallel_world_size", lambda: 1)


def test_w4_goes_to_vllms_cpu_kernel_only_where_its_op_exists_and_in_bf16():
    ok = lk.choose(W4, torch.bfloat16, *SHAPE, features=AVX512, has_op=_op(True))
    assert ok.name == "CPUWNA16LinearKernel" and ok.max_code is None
    fp16 = lk.choose(W4, torch.float16, *SHAPE, features=AVX512, has_op=_op(True))
    assert fp16.name == "CPUWNA16LinearKernel"
    no_op = lk.choose(W4, torch.bfloat16, *SHAPE, features=AVX2, has_op=_op(False))
    assert no_op.kernel is None and "AVX-512" in no_op.reason and "AVX2" in no_op.reason
    fp32 = lk.choose(W4, torch.float32, *SHAPE, features=AVX512, has_op=_op(True))
    assert fp32.kernel is None and "bfloat16" in fp32.reason


def test_formats_no_cpu_kernel_covers_stay_on_overdrive():
    w3 = lk.choose(W3, torch.bfloat16, *SHAPE, features=AVX512, has_op=_op(True))
    assert w3.kernel is None and "uint3" in w3.reason  # vLLM's own reason, from its registry
    w4a8 = lk.choose(W4A8, torch.bfloat16, *SHAPE, features=AVX512, has_op=_op(True))
    assert w4a8.kernel is None and "activations" in w4a8.reason


def test_w8a8_int8_kernel_exact_by_cpu_capability():
    codes = torch.randint(-127, 128, (32, 64), dtype=torch.int32)
    codes[0, 0] = 127
    full = StandardWeight(codes, torch.ones(32, 1))
    seven_bit = StandardWeight(codes.clamp(-64, 64), torch.ones(32, 1))
    vnni = lk.choose(W8A8, torch.bfloat16, *SHAPE, features=AVX512)
    assert vnni.name == "CPUInt8ScaledMMLinearKernel" and vnni.declines(full) is None
    avx2 = lk.choose(W8A8, torch.bfloat16, *SHAPE, features=AVX2)
    assert avx2.name == "CPUInt8ScaledMMLinearKernel" and avx2.max_code == 64
    assert "127" in avx2.declines(full) and avx2.declines(seven_bit) is None


def test_switch_off(monkeypatch):
    monkeypatch.setenv(lk.ENV, "overdrive")
    assert lk.choose(W4, torch.bfloat16, *SHAPE, features=AVX512, has_op=_op(True)).kernel is None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from overdrive.mbq.config import MBQConfig
    from overdrive.mbq.export import export_compressed_tensors
    from overdrive.mbq.quantize import quantize
    from overdrive.testing import tiny_llama

    root = tmp_path_factory.mktemp("handoff")
    made = {}

    def get(bits: int, act_bits: int = 16):
        key = (bits, act_bits)
        if key not in made:
            kw = dict(bits=bits, group_size=64) if act_bits == 16 else dict(bits=bits, act_bits=8)
            mbq = quantize(tiny_llama(), root / f"mbq-{bits}-{act_bits}", MBQConfig(baseline="rtn", **kw))
            made[key] = (load_file(mbq / "model.safetensors"),
                         load_file(export_compressed_tensors(mbq, root / f"ct-{bits}-{act_bits}") / "model.safetensors"))
        return made[key]

    return get


@pytest.mark.parametrize("bits,act_bits", [(4, 16), (3, 16), (8, 8)])
def test_load_time_repack_is_the_exports_tensors(exported, bits, act_bits):
    from overdrive.mbq.config import MBQConfig
    from overdrive.mbq.method import METHOD

    mbq, ct = exported(bits, act_bits)
    cfg = MBQConfig(bits=bits, group_size=64, act_bits=act_bits, baseline="rtn") if act_bits == 16 else \
        MBQConfig(bits=bits, act_bits=8, baseline="rtn")
    fmt = METHOD.weight_format(cfg)
    for p in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        loaded = {n: mbq[f"{p}.{n}"] for n in ("qweight", "scales", "zeros") if f"{p}.{n}" in mbq}
        got = lk.compressed_tensors_params(fmt, METHOD.standard_weight(loaded, cfg), torch.float32)
        for name, t in got.items():
            want = ct[f"{p}.{name}"]
            assert t.shape == want.shape, name
            assert torch.equal(t.data.to(want.dtype), want), name


def test_vllm_int8_kernel_runs_a_handed_off_layer_against_float64():
    """CPUInt8ScaledMMLinearKernel (oneDNN here) on 7-bit codes: exact integer products, so the result is
    the float64 reference up to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    n, k = 64, 128
    codes = torch.randint(-64, 65, (n, k), generator=g, dtype=torch.int32)
    scales = torch.rand(n, 1, generator=g) / 100 + 1e-3
    std = StandardWeight(codes, scales)
    choice = lk.choose(W8A8, torch.float32, (k, n), (k, n))
    if choice.kernel is None or choice.declines(std):
        pytest.skip(f"no vLLM int8 kernel for this layer here: {choice.reason}")
    layer = torch.nn.Module()
    layer.bias = None
    eng = lk.EngineLinear(choice, (k, n), (k, n), torch.float32, [n])
    eng.load(layer, std)
    x = torch.randn(5, k, generator=g)
    xd = x.double()
    sx = xd.abs().amax(-1, keepdim=True) / 127
    xq = (torch.sign(xd / sx) * torch.floor((xd / sx).abs() + 0.5)).clamp(-127, 127)
    want = (xq @ codes.double().T) * sx * scales.double().T
    got = eng.apply(layer, x, None)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("cc,want", [(90, "Marlin"), (80, "Marlin"), (None, None)])
def test_sglang_selection_runs_sglangs_own_marlin_predicates(cc, want):
    pytest.importorskip("sglang")
    from overdrive.adapters.sglang.linear_kernels import choose as sg_choose

    name, why = sg_choose(W4, (4096, 4096), (4096, 4096), cc)
    assert (name or "").startswith(want or "") and (name is None) == (want is None)
    if name is None:
        assert "no CUDA device" in why
    # SmolLM2's 576 input features are not a multiple of Marlin's 128-wide K tiles: SGLang's own check says so
    small, why_small = sg_choose(W4, (576, 1536), (576, 1536), 90)
    assert small is None and "576" in why_small
    w3, why3 = sg_choose(W3, (4096, 4096), (4096, 4096), 90)
    assert w3 is None and "W3" in why3  # SGLang's Marlin takes uint4/uint8 (with zero points) only

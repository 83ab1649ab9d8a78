from __future__ import annotations

import pytest
import torch

from overdrive.kernels import group_shape, pack, packed_length, unpack, unpack_reference
from overdrive.kernels.packing import SUPPORTED_BITS

from .conftest import needs_cuda


def _codes(shape, bits, seed=0, high=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high or (1 << bits), shape, generator=g)


def test_group_shapes():
    assert [group_shape(b) for b in (1, 2, 3, 4, 8, 16)] == [(32, 1), (16, 1), (32, 3), (8, 1), (4, 1), (2, 1)]
    assert packed_length(33, 3) == 6 and packed_length(8, 4) == 1 and packed_length(9, 4) == 2


def test_hand_computed_words():
    # 4-bit: code i at bits [4i, 4i+4) -> codes 1..8 read as hex digits from the right
    assert pack(torch.arange(1, 9), 4).tolist() == [0x87654321 - 2**32]
    # 3-bit: codes [7, 0, 5, 0, ...] -> 7 | 5 << 6 = 327
    c = torch.zeros(32, dtype=torch.long)
    c[0], c[2] = 7, 5
    assert pack(c, 3).tolist() == [327, 0, 0]
    # 3-bit straddling codes: code 10 covers bits 30..32, code 21 covers bits 63..65
    c = torch.zeros(32, dtype=torch.long)
    c[10] = 0b111
    assert pack(c, 3).tolist() == [(0b11 << 30) - 2**32, 0b1, 0]
    c = torch.zeros(32, dtype=torch.long)
    c[21] = 0b101
    assert pack(c, 3).tolist() == [0, (1 << 31) - 2**32, 0b10]
    # 2-bit: code i at bits [2i, 2i+2)
    assert pack(torch.tensor([3, 0, 1]), 2).tolist() == [3 | 1 << 4]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (33,), (3, 77), (2, 3, 100)])
def test_round_trip_reference(bits, shape):
    c = _codes(shape, bits)
    p = pack(c, bits)
    assert p.dtype == torch.int32 and p.shape[-1] == packed_length(shape[-1], bits)
    assert torch.equal(unpack_reference(p, bits, shape[-1]).long(), c)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 5), (3, 77), (4, 300), (2, 2, 33)])
def test_triton_unpack_matches_reference_in_interpreter(interpret, bits, shape):
    mod = interpret("packing")
    # codes avoid 255 so the 0xFF poison can never pass for a written value
    c = _codes(shape, bits, seed=bits, high=min(1 << bits, 255))
    p = pack(c, bits)
    out = torch.full(shape, 255, dtype=torch.uint8 if bits <= 8 else torch.int32)
    got = mod.unpack(p, bits, shape[-1], out=out)
    assert torch.equal(got.long(), c)
    assert torch.equal(unpack(p, bits, shape[-1]).long(), c)  # through dispatch


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"codes has values outside \[0, 8\) for bits=3"):
        pack(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        pack(torch.tensor([1]), 5)
    with pytest.raises(TypeError, match="must be an integer tensor"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(TypeError, match="packed must be int32"):
        unpack(torch.zeros(1, dtype=torch.int64), 4, 8)
    with pytest.raises(ValueError, match="expected 2 words for n=9"):
        unpack(torch.zeros(1, dtype=torch.int32), 4, 9)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_triton_unpack_on_gpu(bits):
    c = _codes((64, 4099), bits)
    p = pack(c, bits).cuda()
    assert torch.equal(unpack(p, bits, 4099).cpu().long(), c)

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from overdrive.kernels import attention_flops, window_attention, window_attention_reference
from overdrive.kernels.window_attention import allowed_mask

from .conftest import needs_cuda


def _qkv(b, h, s, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(3)]


def test_mask_closed_form():
    m = allowed_mask(6, torch.tensor([1]), text_start=0, text_end=2)[0].int()
    expected = torch.tensor([
        [1, 1, 1, 1, 1, 1],  # text rows see everything
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],  # vision rows: text columns + band |i-j| <= 1
        [1, 1, 1, 1, 1, 0],
        [1, 1, 0, 1, 1, 1],
        [1, 1, 0, 0, 1, 1],
    ])
    assert torch.equal(m, expected)


def test_reference_matches_sdpa_with_the_mask_and_full_window_is_full_attention():
    q, k, v = _qkv(2, 3, 29, 16, dtype=torch.float64)
    w = torch.tensor([0, 4, 100])
    mask = allowed_mask(29, w, 20, 29)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
    torch.testing.assert_close(window_attention_reference(q, k, v, w, 20, 29).double(), want, rtol=1e-5, atol=1e-6)
    full = window_attention_reference(q, k, v, torch.tensor([28, 28, 28]))
    torch.testing.assert_close(full.double(), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_flops_closed_form():
    assert attention_flops(10, 8, torch.tensor([9, 9])) == 2 * 10 * 10 * 4 * 8
    assert attention_flops(10, 8, torch.tensor([0])) == 10 * 4 * 8
    # window 1 (3 diagonals: 10 + 2*9 pairs) plus 2 text tokens at the start: rows/cols 0-1 all allowed
    assert attention_flops(10, 8, torch.tensor([1]), 0, 2) == int(allowed_mask(10, torch.tensor([1]), 0, 2).sum()) * 32


CASES = [  # (B, H, S, D, text_start, text_end): odd lengths, text first (Flux), text last (SD3), none (PixArt)
    (1, 2, 37, 16, 0, 0), (2, 3, 70, 32, 0, 9), (1, 2, 65, 16, 50, 65), (1, 4, 33, 16, 10, 13), (1, 1, 5, 16, 0, 0),
]


@pytest.mark.parametrize("b,h,s,d,t0,t1", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_kernel_in_interpreter(interpret, b, h, s, d, t0, t1, seed):
    mod = interpret("window_attention")
    q, k, v = _qkv(b, h, s, d, seed)
    g = torch.Generator().manual_seed(seed + 7)
    w = torch.randint(0, s + 2, (h,), generator=g)  # head-wise, from 0 (diagonal) to beyond full
    out = torch.full_like(q, float("nan"))
    got = mod.window_attention(q, k, v, w, t0, t1, out=out)
    want = window_attention_reference(q.double(), k.double(), v.double(), w, t0, t1)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_dispatch_and_errors(interpret):
    q, k, v = _qkv(1, 2, 20, 16)
    w = torch.tensor([3, 5])
    torch.testing.assert_close(window_attention(q, k, v, w, 0, 4), window_attention_reference(q, k, v, w, 0, 4),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"window must be an integer \(2,\) tensor"):
        window_attention(q, k, v, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"text range \[5, 30\) is not inside \[0, 20\]"):
        window_attention(q, k, v, w, 5, 30)
    with pytest.raises(ValueError, match="share one"):
        window_attention(q, k[:, :, :10], v, w)


@pytest.mark.parametrize("tiles", [(128, 64), (64, 128), (16, 16)])
@pytest.mark.parametrize("s,t0,t1,w", [(300, 0, 77, 5), (300, 230, 300, 40), (257, 100, 140, 0), (200, 0, 0, 150)])
def test_triton_tilings_in_interpreter(interpret, tiles, s, t0, t1, w):
    """The GPU tiling (BM 128, BN 64) and others: band + text loops visit every allowed key block once."""
    mod = interpret("window_attention")
    q, k, v = _qkv(1, 2, s, 16, seed=s + w)
    win = torch.tensor([w, 3 * w + 1])
    got = mod.window_attention(q, k, v, win, t0, t1, tiles=tiles)
    want = window_attention_reference(q.double(), k.double(), v.double(), win, t0, t1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", ["triton", "flex"])
@pytest.mark.parametrize("s,t0,t1", [(4096 + 512, 0, 512), (4097, 0, 0), (3001, 2900, 3001)])
def test_kernels_on_gpu(path, s, t0, t1):
    from overdrive.kernels.dispatch import load_triton_module
    from overdrive.kernels.window_attention import flex_window_attention

    triton_window_attention = load_triton_module("window_attention", interpret=False).window_attention

    q, k, v = [t.cuda() for t in _qkv(1, 8, s, 64, seed=s, dtype=torch.float16)]
    w = torch.tensor([0, 64, 128, 256, 1024, 2048, 4096, 8192], device="cuda")
    fn = triton_window_attention if path == "triton" else flex_window_attention
    got = fn(q, k, v, w, t0, t1)
    want = window_attention_reference(q.float(), k.float(), v.float(), w, t0, t1)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    # the public op on CUDA (the Triton kernel), with the window given on the CPU as the runtime does
    torch.testing.assert_close(window_attention(q, k, v, w.cpu(), t0, t1).float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("b,h,s,d,t0,t1", CASES)
@pytest.mark.parametrize("chunk", [8, 256])
def test_blocked_cpu_path_matches_dense_reference(b, h, s, d, t0, t1, chunk):
    from overdrive.kernels.window_attention import window_attention_blocked

    q, k, v = _qkv(b, h, s, d, seed=s, dtype=torch.float64)
    g = torch.Generator().manual_seed(s)
    w = torch.randint(0, s + 2, (h,), generator=g)
    w[0] = 2  # at least one band head
    got = window_attention_blocked(q, k, v, w, t0, t1, chunk=chunk)
    torch.testing.assert_close(got, window_attention_reference(q, k, v, w, t0, t1), rtol=1e-10, atol=1e-12)


def test_closed_form_pair_count_equals_the_mask():
    from overdrive.kernels.window_attention import allowed_pairs

    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        s = int(torch.randint(1, 40, (1,), generator=g))
        w = int(torch.randint(0, s + 3, (1,), generator=g))
        t0 = int(torch.randint(0, s + 1, (1,), generator=g))
        t1 = int(torch.randint(t0, s + 1, (1,), generator=g))
        assert allowed_pairs(s, w, t0, t1) == int(allowed_mask(s, torch.tensor([w]), t0, t1).sum()), (s, w, t0, t1)

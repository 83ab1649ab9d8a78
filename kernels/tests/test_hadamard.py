"""Hadamard transforms against dense float64 matrices; the Triton kernel in the interpreter."""
from __future__ import annotations

import pytest
import torch

from overdrive.kernels.hadamard import (hadamard_matrix, hadamard_matrix_of, hadamard_transform,
                                        hadamard_transform_reference, hadamard_transform_transposed,
                                        random_hadamard, split_size)


def test_sylvester_matrix_is_orthogonal_with_unit_magnitude_entries():
    for p in (1, 2, 8, 64):
        h = hadamard_matrix(p, normalized=False)
        assert set(h.unique().tolist()) <= {-1.0, 1.0}
        torch.testing.assert_close(h @ h.T, p * torch.eye(p, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)


@pytest.mark.parametrize("n,block", [(64, None), (576, None), (1536, 512), (96, 32), (12, None)])
def test_transform_equals_the_dense_orthogonal_matrix(n, block):
    rh = random_hadamard(n, seed=3, block=block)
    t = hadamard_matrix_of(n, rh.signs, rh.mixer, rh.block)
    torch.testing.assert_close(t @ t.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(rh(x), x @ t, atol=1e-12, rtol=0)
    torch.testing.assert_close(rh.transpose(rh(x)), x, atol=1e-12, rtol=0)
    # a composite size: the block is m x p with an m x m orthogonal mixer
    m, p = split_size(rh.block)
    assert m * p == rh.block and p & (p - 1) == 0 and (rh.mixer is None) == (m == 1)


def test_576_is_a_64_hadamard_with_a_9x9_orthogonal_block():
    rh = random_hadamard(576, seed=0)
    assert split_size(576) == (9, 64) and rh.mixer.shape == (9, 9)
    x = torch.randn(4, 576, dtype=torch.float64)
    expect = x @ (rh.signs[:, None] * torch.kron(rh.mixer, hadamard_matrix(64)))
    torch.testing.assert_close(rh(x), expect, atol=1e-12, rtol=0)


def test_bad_arguments_are_named():
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="block 64 does not divide"):
        hadamard_transform(x, block=64)
    with pytest.raises(ValueError, match="not a power of two; pass an orthogonal"):
        hadamard_transform(x)
    with pytest.raises(ValueError, match="signs has shape"):
        hadamard_transform(x, signs=torch.ones(32), block=32)


@pytest.mark.parametrize("rows,n,block,dtype", [(7, 256, None, torch.float32), (33, 96, 32, torch.float32),
                                                 (5, 384, 128, torch.float16), (3, 8, None, torch.float32)])
def test_triton_kernel_in_the_interpreter_matches_float64(monkeypatch, rows, n, block, dtype):
    monkeypatch.setenv("OVERDRIVE_KERNELS", "interpret")
    rh = random_hadamard(n, seed=1, block=block)
    x = torch.randn(rows, n).to(dtype)
    got = hadamard_transform(x, rh.signs, rh.mixer, rh.block)
    ref = hadamard_transform_reference(x.double(), rh.signs, rh.mixer, rh.block)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
    assert got.dtype == dtype


def test_transposed_is_the_inverse():
    rh = random_hadamard(192, seed=2)
    x = torch.randn(4, 192, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform_transposed(rh(x), rh.signs, rh.mixer, rh.block), x,
                               atol=1e-12, rtol=0)

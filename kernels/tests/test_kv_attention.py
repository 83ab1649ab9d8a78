from __future__ import annotations

import pytest
import torch

from overdrive.kernels import kv_dequantize, kv_quantize
from overdrive.kernels.kv_attention import (cell_words, kv_cache_store, kv_decode_attention, kv_group_size,
                                            pack_cells, paged_kv_attention_reference, unpack_cells)
from overdrive.kernels.kv_quant import KV_BITS

from .conftest import needs_cuda


def _paged(seq_lens, h, d, bits, group, bs, gen, dtype=torch.float32):
    """Random K/V per row written into shuffled pages; returns pages, block table and the raw K/V."""
    n_blocks = sum(-(-s // bs) for s in seq_lens) + 3
    perm = torch.randperm(n_blocks, generator=gen).to(torch.int32)
    pages = torch.zeros(n_blocks, h, bs, cell_words(d, bits, group), dtype=torch.int32)
    max_b = max(-(-s // bs) for s in seq_lens)
    table = torch.full((len(seq_lens), max_b), -1, dtype=torch.int32)
    raw, nxt = [], 0
    for r, s in enumerate(seq_lens):
        nb = -(-s // bs)
        table[r, :nb] = perm[nxt:nxt + nb]
        nxt += nb
        k = torch.randn(s, h, d, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
        v = torch.randn(s, h, d, generator=gen, dtype=torch.float64)
        pos = torch.arange(s)
        slots = table[r].long()[pos // bs] * bs + pos % bs
        kv_cache_store(pages, slots, k.to(dtype), v.to(dtype), bits, group)
        raw.append((k, v))
    return pages, table, raw


def _dequant_reference(x, bits, group):
    p, s, z = kv_quantize(x.float(), bits, group)
    return kv_dequantize(p, s, z, bits, x.shape[-1], group).double()


def _dense_attention(q, k, v, scale):
    """float64 causal attention of the last q.shape[1] positions; q (Hq, m, D), k/v (Hk, L, D)."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    m, total = q.shape[1], k.shape[1]
    s = q @ k.transpose(1, 2) * scale
    allowed = torch.arange(total)[None, :] <= (total - m + torch.arange(m))[:, None]
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def test_group_and_cell_size():
    assert kv_group_size(128) == 128 and kv_group_size(32) == 32 and kv_group_size(256) == 128
    assert kv_group_size(96) == 32
    with pytest.raises(ValueError, match="multiple of 32, got 80"):
        kv_group_size(80)
    # head 128 at 2 bits: 8 + 8 code words, 4 float32 (one group)
    assert cell_words(128, 2, 128) == 20 and cell_words(32, 16, 32) == 36


@pytest.mark.parametrize("bits", KV_BITS)
def test_cells_round_trip_equals_quantizer(bits):
    g = torch.Generator().manual_seed(bits)
    k, v = torch.randn(5, 3, 64, generator=g), torch.randn(5, 3, 64, generator=g) * 4
    ku, vu = unpack_cells(pack_cells(k, v, bits, 32), bits, 64, 32)
    assert torch.equal(ku.double(), _dequant_reference(k, bits, 32))
    assert torch.equal(vu.double(), _dequant_reference(v, bits, 32))


@pytest.mark.parametrize("bits", [8, 2])
def test_paged_reference_matches_dense_float64(bits):
    g = torch.Generator().manual_seed(0)
    hq, hk, d, bs, group = 4, 2, 64, 16, 64
    total, new = [37, 5, 16], [4, 1, 3]  # mixed: prefill-like continuation, decode, block-aligned
    pages, table, raw = _paged([t - n for t, n in zip(total, new)], hk, d, bits, group, bs, g)
    qs, ks, vs, qsl = [], [], [], [0]
    for (k, v), n in zip(raw, new):
        qs.append(torch.randn(n, hq, d, generator=g, dtype=torch.float64))
        ks.append(torch.randn(n, hk, d, generator=g, dtype=torch.float64))
        vs.append(torch.randn(n, hk, d, generator=g, dtype=torch.float64))
        qsl.append(qsl[-1] + n)
    prev = torch.tensor([t - n for t, n in zip(total, new)])
    out = paged_kv_attention_reference(torch.cat(qs).float(), torch.cat(ks).float(), torch.cat(vs).float(), pages,
                                       table, prev, torch.tensor(qsl), bits, group, d ** -0.5)
    for r, ((k, v), n) in enumerate(zip(raw, new)):
        kk = torch.cat([_dequant_reference(k, bits, group), ks[r]]).transpose(0, 1)
        vv = torch.cat([_dequant_reference(v, bits, group), vs[r]]).transpose(0, 1)
        want = _dense_attention(qs[r].transpose(0, 1), kk, vv, d ** -0.5).transpose(0, 1)
        assert torch.allclose(out[qsl[r]:qsl[r + 1]].double(), want, atol=2e-5), (r, bits)


def test_full_precision_store_positions_are_exact():
    g = torch.Generator().manual_seed(1)
    hk, d, bs, group, bits = 2, 32, 16, 32, 2
    lp = 40
    pages, table, raw = _paged([lp], hk, d, bits, group, bs, g)
    k, v = raw[0]
    # full-precision store: one slot per block (slot = 2 - block index), filled with the raw values
    nb = table.shape[1]
    pool = torch.zeros(nb, hk, bs, 2 * d)
    for b in range(nb):
        seg = slice(b * bs, min((b + 1) * bs, lp))
        n = seg.stop - seg.start
        pool[nb - 1 - b, :, :n, :d] = k[seg].transpose(0, 1).float()
        pool[nb - 1 - b, :, :n, d:] = v[seg].transpose(0, 1).float()
    fbt = torch.tensor([[nb - 1 - b for b in range(nb)]], dtype=torch.int32)
    q = torch.randn(1, 2, d, generator=g, dtype=torch.float64)
    kn, vn = torch.randn(1, hk, d, generator=g, dtype=torch.float64), torch.randn(1, hk, d, generator=g, dtype=torch.float64)
    fp_from, sink = 20, 1
    out = kv_decode_attention(q.float(), kn.float(), vn.float(), pages, table, torch.tensor([lp]), bits, group,
                              d ** -0.5, pool, fbt, torch.tensor([fp_from]), sink, torch.tensor([1]))
    kd, vd = _dequant_reference(k, bits, group), _dequant_reference(v, bits, group)
    exact = torch.zeros(lp, dtype=torch.bool)
    exact[:sink] = True
    exact[fp_from:] = True
    kd[exact], vd[exact] = k.float().double()[exact], v.float().double()[exact]
    kk = torch.cat([kd, kn]).transpose(0, 1)
    vv = torch.cat([vd, vn]).transpose(0, 1)
    want = _dense_attention(q.transpose(0, 1), kk, vv, d ** -0.5).transpose(0, 1)
    assert torch.allclose(out.double(), want, atol=2e-5)


def test_bad_pages_are_rejected():
    with pytest.raises(ValueError, match="expected 20"):
        kv_cache_store(torch.zeros(2, 1, 16, 19, dtype=torch.int32), torch.tensor([0]), torch.zeros(1, 1, 128),
                       torch.zeros(1, 1, 128), 2, 128)


@pytest.mark.parametrize("bits", KV_BITS)
@pytest.mark.parametrize("hq,hk,d,bs,lens,fp", [
    (4, 2, 32, 16, [1, 17, 40], False),
    (2, 2, 64, 32, [0, 33], True),
    (6, 2, 96, 16, [29, 50], True),   # head size not a power of two, GQA group of 3
])
def test_triton_decode_matches_reference_in_interpreter(interpret, bits, hq, hk, d, bs, lens, fp):
    mod = interpret("kv_attention")
    g = torch.Generator().manual_seed(bits + d)
    group = kv_group_size(d)
    pages, table, _ = _paged([max(s, 1) for s in lens], hk, d, bits, group, bs, g)
    r = len(lens)
    q = torch.randn(r, hq, d, generator=g)
    kn, vn = torch.randn(r, hk, d, generator=g), torch.randn(r, hk, d, generator=g)
    prev = torch.tensor(lens, dtype=torch.int32)
    extra = {}
    if fp:
        nb = table.shape[1]
        pool = torch.randn(r * nb, hk, bs, 2 * d, generator=g)
        fbt = torch.arange(r * nb, dtype=torch.int32).reshape(r, nb)
        extra = dict(fp_pool=pool, fp_block_table=fbt, fp_from=(prev - 7).clamp_min(0), sink=1,
                     sink_ok=torch.ones(r, dtype=torch.int32))
    got = mod.kv_decode_attention(q, kn, vn, pages, table, prev, bits, group, d ** -0.5, **extra)
    want = paged_kv_attention_reference(q, kn, vn, pages, table, prev, torch.arange(r + 1), bits, group, d ** -0.5,
                                        extra.get("fp_pool"), extra.get("fp_block_table"), extra.get("fp_from"),
                                        extra.get("sink", 0), extra.get("sink_ok"))
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", KV_BITS)
def test_triton_decode_on_gpu(bits):
    g = torch.Generator().manual_seed(0)
    pages, table, _ = _paged([300, 1000], 8, 128, bits, 128, 16, g)
    q = torch.randn(2, 32, 128, generator=g)
    kn, vn = torch.randn(2, 8, 128, generator=g), torch.randn(2, 8, 128, generator=g)
    prev = torch.tensor([300, 1000], dtype=torch.int32)
    want = paged_kv_attention_reference(q, kn, vn, pages, table, prev, torch.arange(3), bits, 128, 128 ** -0.5)
    got = kv_decode_attention(q.cuda(), kn.cuda(), vn.cuda(), pages.cuda(), table.cuda(), prev.cuda(), bits, 128,
                              128 ** -0.5)
    assert torch.allclose(got.cpu(), want, atol=1e-4)

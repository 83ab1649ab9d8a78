from __future__ import annotations

import pytest
import torch

from overdrive.kernels import kv_dequantize, kv_quantize
from overdrive.kernels.kv_attention import (cell_words, kv_cache_store, kv_decode_attention, kv_group_size,
                                            pack_cells, paged_kv_attention, paged_kv_attention_reference,
                                            unpack_cells)
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


DECODE_CASES = [
    (4, 2, 32, 16, [1, 17, 40], False),
    (2, 2, 64, 32, [0, 33], True),
    (6, 2, 96, 16, [29, 50], True),   # head size not a power of two, GQA group of 3
]


@pytest.mark.parametrize("bits,hq,hk,d,bs,lens,fp", [
    # the odd head size runs at every width in the full suite, at 2 bits in the fast tier (~8 s per width)
    pytest.param(bits, *case, marks=pytest.mark.slow if case[2] == 96 and bits != 2 else ())
    for case in DECODE_CASES for bits in KV_BITS])
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



def _mixed_step(bits, hq, hk, d, bs, cached, new, seed, fp):
    """A step with rows of ``cached`` tokens and ``new`` new tokens each; returns the op's inputs and a
    float64 expectation per row built from the raw K/V (store positions exact, the rest dequantized)."""
    g = torch.Generator().manual_seed(seed)
    group = kv_group_size(d)
    pages, table, raw = _paged([max(c, 1) for c in cached], hk, d, bits, group, bs, g)
    qs = [torch.randn(n, hq, d, generator=g, dtype=torch.float64) for n in new]
    ks = [torch.randn(n, hk, d, generator=g, dtype=torch.float64) for n in new]
    vs = [torch.randn(n, hk, d, generator=g, dtype=torch.float64) for n in new]
    qsl = [0]
    for n in new:
        qsl.append(qsl[-1] + n)
    prev = torch.tensor(cached, dtype=torch.int32)
    sink = 1
    extra, fp_from = {}, [max(c - 9, 0) for c in cached]
    if fp:
        nb = table.shape[1]
        pool = torch.zeros(len(cached) * nb, hk, bs, 2 * d)
        fbt = torch.arange(len(cached) * nb, dtype=torch.int32).reshape(len(cached), nb)
        for r, (k, v) in enumerate(raw):
            for p in range(cached[r]):
                pool[fbt[r, p // bs], :, p % bs] = torch.cat([k[p], v[p]], -1).float()
        extra = dict(fp_pool=pool, fp_block_table=fbt, fp_from=torch.tensor(fp_from, dtype=torch.int32), sink=sink,
                     sink_ok=torch.tensor([1, 0] * len(cached), dtype=torch.int32)[:len(cached)])
    want = []
    for r, (k, v) in enumerate(raw):
        c = cached[r]
        kd, vd = ((_dequant_reference(k[:c], bits, group), _dequant_reference(v[:c], bits, group)) if c else
                  (k[:0].clone(), v[:0].clone()))
        if fp:
            exact = torch.arange(c) >= fp_from[r]
            if extra["sink_ok"][r]:
                exact |= torch.arange(c) < sink
            kd[exact], vd[exact] = k[:c].float().double()[exact], v[:c].float().double()[exact]
        kk = torch.cat([kd, ks[r].float().double()]).transpose(0, 1)
        vv = torch.cat([vd, vs[r].float().double()]).transpose(0, 1)
        want.append(_dense_attention(qs[r].float().double().transpose(0, 1), kk, vv, d ** -0.5).transpose(0, 1))
    args = (torch.cat(qs).float(), torch.cat(ks).float(), torch.cat(vs).float(), pages, table, prev, qsl, bits, group,
            d ** -0.5)
    return args, extra, qsl, want


# rows: decode, a chunked-prefill piece over a long prefix, a fresh prompt, a prefix-cache hit, decode at 0
MIXED = dict(cached=[40, 70, 0, 33, 0], new=[1, 23, 19, 5, 1])


@pytest.mark.parametrize("bits", [16, 4, 2])
@pytest.mark.parametrize("fp", [False, True])
@pytest.mark.parametrize("chunk", [1024, 6])
def test_mixed_step_matches_float64(bits, fp, chunk):
    args, extra, qsl, want = _mixed_step(bits, 4, 2, 64, 16, seed=bits, fp=fp, **MIXED)
    out = paged_kv_attention(*args, **extra, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == args[0].shape
    for r in range(len(want)):
        assert torch.allclose(out[qsl[r]:qsl[r + 1]].double(), want[r], atol=3e-5), (r, bits)
    # host lists or device tensors for the lengths give the same result; so does the reference
    again = paged_kv_attention(*args[:6], torch.tensor(qsl), *args[7:], **extra, chunk=chunk,
                               host_prev_lens=args[5].tolist())
    assert torch.equal(again, out)
    ref = paged_kv_attention_reference(*args[:6], torch.tensor(qsl), *args[7:], **extra)
    assert torch.allclose(out, ref, atol=3e-5)


@pytest.mark.slow  # ~25 s in the interpreter; the decode kernel itself is in the fast tier above
def test_mixed_step_decode_rows_run_the_triton_kernel_in_interpreter(interpret):
    interpret("kv_attention")
    args, extra, qsl, want = _mixed_step(4, 6, 2, 96, 16, seed=3, fp=True, **MIXED)
    out = paged_kv_attention(*args, **extra, chunk=8)
    for r in range(len(want)):
        assert torch.allclose(out[qsl[r]:qsl[r + 1]].double(), want[r], atol=3e-5), r


def test_pure_decode_and_bf16_steps():
    args, extra, qsl, want = _mixed_step(8, 4, 4, 32, 16, cached=[5, 17, 0], new=[1, 1, 1], seed=7, fp=True)
    out = paged_kv_attention(*args, **extra)
    assert torch.allclose(out.double(), torch.cat(want), atol=3e-5)
    # bf16 activations: attention runs in bf16 (fp32 accumulation inside SDPA); error at bf16 level
    args, extra, qsl, want = _mixed_step(8, 4, 2, 64, 16, seed=8, fp=False, **MIXED)
    out = paged_kv_attention(args[0].bfloat16(), args[1].bfloat16(), args[2].bfloat16(), *args[3:], **extra)
    assert out.dtype == torch.bfloat16
    err = max((out[qsl[r]:qsl[r + 1]].double() - want[r]).abs().max().item() for r in range(len(want)))
    assert err < 0.05


def test_mixed_step_rejects_bad_shapes():
    args, extra, qsl, _ = _mixed_step(4, 4, 2, 64, 16, cached=[3, 0], new=[2, 1], seed=0, fp=False)
    with pytest.raises(ValueError, match="do not fit query_start_loc"):
        paged_kv_attention(*args[:6], [0, 2, 4], *args[7:])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        paged_kv_attention(*args, chunk=0)

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

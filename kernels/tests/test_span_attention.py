"""Per-head sparse-span attention (overdrive.kernels.span_attention): the torch implementations and the Triton
kernels (in Triton's interpreter) vs a float64 masked reference written here from the definition, on odd
shapes (lengths and head sizes that are not multiples of the tiles, GQA groups of 3, sinks that end inside a
tile), with shared and per-head block tables over shuffled pages."""
from __future__ import annotations

import pytest
import torch

from overdrive.contracts.kv_cache import HeadSpans
from overdrive.kernels.span_attention import (span_attention_dense, span_kv_bytes_read, span_paged_attention,
                                              span_prefill_attention)

from .conftest import needs_cuda


def _reference(q, k, v, q_pos, starts, sink, scale):
    """float64: query i (position q_pos[i]) of KV head h reads key position p (the row index of k) when
    p <= q_pos[i] and (p < sink or p >= starts[i, h])."""
    m, hq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    out = torch.zeros(m, hq, d, dtype=torch.float64)
    for i in range(m):
        t = int(q_pos[i])
        for h in range(hq):
            kh = h // g
            keys = [p for p in range(t + 1) if p < sink or p >= int(starts[i, kh])]
            kk, vv = k[keys, kh].double(), v[keys, kh].double()
            w = torch.softmax(kk @ q[i, h].double() * scale, 0)
            out[i, h] = w @ vv
    return out


def _starts(spans: HeadSpans, lengths, sink):
    return spans.starts(torch.as_tensor(lengths), sink)


SPANS = HeadSpans((3.0, -6.0), (0.25, 0.625), 5)  # two KV heads with different elastic spans
PREFILL_CASES = [  # (row lengths, Hq, Hk, D, sink)
    ([37], 6, 2, 40, 3), ([50, 1, 17], 4, 2, 24, 4), ([5, 33], 6, 2, 16, 0), ([70], 2, 2, 32, 16),
]


def _seqs(lens, hq, hk, d, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hk, d, generator=g) * 2
    v = torch.randn(n, hk, d, generator=g)
    return q, k, v


def _spans(hk):
    a = (3.0, -6.0, 0.0)[:hk]
    b = (0.25, 0.625, 0.5)[:hk]
    return HeadSpans(a, b, 5)


@pytest.mark.parametrize("lens,hq,hk,d,sink", PREFILL_CASES)
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_prefill_matches_float64_reference(request, backend, lens, hq, hk, d, sink, monkeypatch):
    spans = HeadSpans(_spans(hk).alpha, _spans(hk).beta, max(5, sink))
    q, k, v = _seqs(lens, hq, hk, d, seed=len(lens) + d)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    pos = torch.cat([torch.arange(n) for n in lens])
    starts = _starts(spans, pos + 1, sink)
    scale = d ** -0.5
    if backend == "torch":
        monkeypatch.setenv("OVERDRIVE_KERNELS", "torch")
        got = span_prefill_attention(q, k, v, cu, starts, sink, scale)
    else:
        mod = request.getfixturevalue("interpret")("span_attention")
        got = mod.span_prefill_attention(q, k, v, cu, starts, sink, scale)
    for r in range(len(lens)):
        a, b = cu[r], cu[r + 1]
        want = _reference(q[a:b], k[a:b], v[a:b], pos[a:b], starts[a:b], sink, scale)
        torch.testing.assert_close(got[a:b].double(), want, rtol=1e-4, atol=1e-5)


def test_prefill_tiles_and_sparsity_are_real(interpret):
    """Other tile shapes give the same result, and the spans are not vacuous (dense causal attention differs)."""
    mod = interpret("span_attention")
    lens, hq, hk, d, sink = [45], 4, 2, 20, 3
    q, k, v = _seqs(lens, hq, hk, d, seed=3)
    pos = torch.arange(45)
    starts = _starts(_spans(hk), pos + 1, sink)
    want = _reference(q, k, v, pos, starts, sink, d ** -0.5)
    for tiles in [(16, 32), (32, 16)]:
        got = mod.span_prefill_attention(q, k, v, [0, 45], starts, sink, d ** -0.5, tiles=tiles)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    dense = _reference(q, k, v, pos, torch.full_like(starts, sink), sink, d ** -0.5)
    assert (dense - want).abs().max() > 1e-2


def _paged(lens, hk, d, bs, seed, per_head):
    """K/V of each row written into shuffled pages; returns (k_pages, v_pages, table, raw per row)."""
    g = torch.Generator().manual_seed(seed)
    nb = [-(-n // bs) for n in lens]
    heads_per_page = 1 if per_head else hk
    total = (sum(nb) * (hk if per_head else 1)) + 3
    perm = torch.randperm(total, generator=g)
    kp = torch.zeros(total, heads_per_page, bs, d)
    vp = torch.zeros(total, heads_per_page, bs, d)
    table = torch.full((len(lens), hk, max(nb)) if per_head else (len(lens), max(nb)), -1, dtype=torch.int32)
    raw, nxt = [], 0
    for r, n in enumerate(lens):
        k = torch.randn(n, hk, d, generator=g) * 2
        v = torch.randn(n, hk, d, generator=g)
        raw.append((k, v))
        for i in range(nb[r]):
            sl = slice(i * bs, min(n, (i + 1) * bs))
            if per_head:
                for h in range(hk):
                    page = int(perm[nxt])
                    nxt += 1
                    table[r, h, i] = page
                    kp[page, 0, :sl.stop - sl.start] = k[sl, h]
                    vp[page, 0, :sl.stop - sl.start] = v[sl, h]
            else:
                page = int(perm[nxt])
                nxt += 1
                table[r, i] = page
                kp[page, :, :sl.stop - sl.start] = k[sl].transpose(0, 1)
                vp[page, :, :sl.stop - sl.start] = v[sl].transpose(0, 1)
    return kp, vp, table, raw


PAGED_CASES = [  # (row lengths, queries per row (the last positions), Hq, Hk, D, block size, sink, per-head pages)
    ([40, 9, 77], [1, 1, 1], 6, 2, 40, 16, 3, False),   # decode step
    ([33, 20], [5, 1], 4, 2, 24, 8, 4, True),           # chunked prefill + decode, per-head pages
    ([70], [70], 2, 2, 32, 32, 16, False),             # a whole prompt through the paged path
    ([3, 51], [1, 2], 3, 1, 16, 4, 0, True),            # no sink, G = 3, tiny blocks
]


@pytest.mark.parametrize("lens,nq,hq,hk,d,bs,sink,per_head", PAGED_CASES)
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_paged_matches_float64_reference(request, backend, lens, nq, hq, hk, d, bs, sink, per_head, monkeypatch):
    kp, vp, table, raw = _paged(lens, hk, d, bs, seed=d + bs, per_head=per_head)
    g = torch.Generator().manual_seed(11)
    spans = HeadSpans(_spans(hk).alpha, _spans(hk).beta, max(5, sink))
    rows = torch.cat([torch.full((n,), r) for r, n in enumerate(nq)])
    pos = torch.cat([torch.arange(lens[r] - n, lens[r]) for r, n in enumerate(nq)])
    q = torch.randn(len(pos), hq, d, generator=g)
    starts = _starts(spans, pos + 1, sink)
    scale = d ** -0.5
    if backend == "torch":
        monkeypatch.setenv("OVERDRIVE_KERNELS", "torch")
        got = span_paged_attention(q, kp, vp, table, rows, pos, starts, sink, scale)
    else:
        mod = request.getfixturevalue("interpret")("span_attention")
        got = mod.span_paged_attention(q, kp, vp, table, rows, pos, starts, sink, scale)
    for i in range(len(pos)):
        k, v = raw[int(rows[i])]
        want = _reference(q[i:i + 1], k, v, pos[i:i + 1], starts[i:i + 1], sink, scale)
        torch.testing.assert_close(got[i:i + 1].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_paged_reads_nothing_outside_the_span(request, backend, monkeypatch):
    """Pages of positions a head does not read are dropped (block table -1, page contents NaN): both
    implementations still give the reference, so they never read them; the torch one names a page that a
    wider span would need."""
    lens, hk, d, bs, sink = [90], 2, 16, 8, 4
    kp, vp, table, raw = _paged(lens, hk, d, bs, seed=5, per_head=True)
    spans = HeadSpans((10.0, 20.0), (0.0, 0.0), 10)  # fixed windows of 10 and 20 positions
    pos = torch.tensor([89])
    starts = _starts(spans, pos + 1, sink)  # 84 and 74
    for h in range(hk):
        for i in range(1, table.shape[2]):  # block 0 holds the sink
            if (i + 1) * bs <= int(starts[0, h]):
                kp[table[0, h, i]] = float("nan")
                vp[table[0, h, i]] = float("nan")
                table[0, h, i] = -1
    q = torch.randn(1, 2, d, generator=torch.Generator().manual_seed(0))
    if backend == "torch":
        monkeypatch.setenv("OVERDRIVE_KERNELS", "torch")
        fn = span_paged_attention
    else:
        fn = request.getfixturevalue("interpret")("span_attention").span_paged_attention
    got = fn(q, kp, vp, table, torch.tensor([0]), pos, starts, sink, d ** -0.5)
    torch.testing.assert_close(got.double(), _reference(q, *raw[0], pos, starts, sink, d ** -0.5), rtol=1e-4, atol=1e-5)
    if backend == "torch":
        wide = starts.clone()
        wide[0, 0] = 30  # head 0 would now need a dropped page
        with pytest.raises(ValueError, match="has no page"):
            fn(q, kp, vp, table, torch.tensor([0]), pos, wide, sink, d ** -0.5)


def test_dense_definition_and_bytes_read():
    q, k, v = _seqs([12], 4, 2, 8, seed=0)
    pos = torch.arange(12)
    starts = _starts(HeadSpans((4.0, 0.0), (0.0, 1.0), 4), pos + 1, 2)
    got = span_attention_dense(q.double(), k.double(), v.double(), pos, pos, starts, 2, 0.3)
    torch.testing.assert_close(got, _reference(q, k, v, pos, starts, 2, 0.3))
    # head 0 reads min(t+1, 4) positions (2 sink + 2 recent), head 1 all t+1; K and V, D=8, 4 bytes
    reads = sum(min(t + 1, 4) + t + 1 for t in range(12))
    assert span_kv_bytes_read(pos, starts, 2, 8, 4) == reads * 2 * 8 * 4


def test_input_errors():
    q, k, v = _seqs([10], 4, 2, 8, seed=0)
    st = torch.zeros(10, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to 10"):
        span_prefill_attention(q, k, v, [0, 4], st, 0, 1.0)
    with pytest.raises(ValueError, match=r"starts \(10, 3\) must be \(tokens, KV heads\)"):
        span_prefill_attention(q, k, v, [0, 10], torch.zeros(10, 3), 0, 1.0)
    with pytest.raises(ValueError, match="one-head pages need a per-head block table"):
        span_paged_attention(q[:1], torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), torch.zeros(1, 2, dtype=torch.int32),
                             torch.tensor([0]), torch.tensor([9]), st[:1], 0, 1.0)


@needs_cuda
@pytest.mark.gpu
def test_cuda_kernels_match_reference_bf16():
    lens, hq, hk, d, sink = [300, 129], 8, 2, 64, 16
    q, k, v = (t.cuda().bfloat16() for t in _seqs(lens, hq, hk, d, seed=0))
    pos = torch.cat([torch.arange(n) for n in lens])
    starts = _starts(_spans(hk), pos + 1, sink).cuda()
    got = span_prefill_attention(q, k, v, [0, 300, 429], starts, sink, d ** -0.5)
    want = _reference(q[:300].cpu(), k[:300].cpu(), v[:300].cpu(), pos[:300], starts[:300].cpu(), sink, d ** -0.5)
    torch.testing.assert_close(got[:300].double().cpu(), want, rtol=3e-2, atol=3e-2)


@needs_cuda
@pytest.mark.gpu
def test_cuda_paged_kernel_matches_reference_bf16():
    lens, hk, d, bs, sink = [700, 129], 2, 128, 16, 64
    kp, vp, table, raw = _paged(lens, hk, d, bs, seed=1, per_head=False)
    q = torch.randn(2, 8, d, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([699, 128])
    starts = _starts(_spans(hk), pos + 1, sink)
    got = span_paged_attention(q.cuda().bfloat16(), kp.cuda().bfloat16(), vp.cuda().bfloat16(), table.cuda(),
                               torch.tensor([0, 1]).cuda(), pos.cuda(), starts.cuda(), sink, d ** -0.5)
    for i in range(2):
        want = _reference(q[i:i + 1], *raw[i], pos[i:i + 1], starts[i:i + 1], sink, d ** -0.5)
        torch.testing.assert_close(got[i:i + 1].double().cpu(), want, rtol=3e-2, atol=3e-2)

"""Attention over a paged KV cache holding PM-KVQ codes, with a full-precision sink and recent window.

Page cell layout (one cell per (token, KV head); ``cell_words(D, bits, group)`` int32 words)::

    [ K codes | V codes | K scale | K zero | V scale | V zero ]
      Wb words  Wb words  ng f32    ng f32   ng f32    ng f32       Wb = packed_length(D, bits), ng = D / group

Codes and per-token-per-group scale/zero are those of :mod:`overdrive.kernels.kv_quant` (float32
scale and zero stored bit for bit in int32 words). A page is a ``(num_blocks, H, block_size,
cell_words)`` int32 tensor (a view of an engine's cache; the last dim must be contiguous).

Positions read at full precision come from a *full-precision store* ``fp_pool`` of shape
``(slots, H, block_size, 2 * D)`` (K then V), addressed per row through ``fp_block_table`` (the
store slot of each block of the row, -1 for none). For row ``r`` with ``prev_lens[r]`` cached
tokens, position ``p < prev_lens[r]`` is read from the store when ``p < sink and sink_ok[r]`` or
``p >= fp_from[r]``; otherwise its page cell is dequantized. The tokens of the current step
(``k_new``/``v_new``) are always attended at full precision (they are quantized after attention).

Ops:

* :func:`kv_cache_store` writes K/V of new tokens into page cells at ``slot = block * block_size + offset``.
* :func:`paged_kv_attention_reference`: any mix of prefill and decode rows (causal), float32 math.
* :func:`kv_decode_attention`: decode rows (one query token each); the Triton kernel
  (``triton_impl/kv_attention.py``) dequantizes inside the attention loop, the reference is the
  function above.
* :func:`paged_kv_attention`: what an engine step runs, any mix of rows. Decode rows go to
  :func:`kv_decode_attention` in one call; each prefill row (several new tokens, e.g. a chunked-prefill
  piece or a prompt after a prefix-cache hit) dequantizes its cached prefix once and attends through
  ``F.scaled_dot_product_attention`` (flash/efficient kernels on CUDA) in chunks of query rows, so
  memory stays ``chunk x length`` per head instead of the reference's ``new x length`` float32 scores.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .dispatch import Op, register_op
from .kv_quant import KV_BITS, kv_quantize
from .packing import packed_length, unpack_reference


def kv_group_size(head_size: int, max_group: int = 128) -> int:
    """Channels per scale/zero group for a head size: 128, or the whole head when it is smaller."""
    g = math.gcd(head_size, max_group)
    if head_size % 32 or g < 32:
        raise ValueError(f"PM-KVQ kernels need a head size that is a multiple of 32, got {head_size}")
    return g


def cell_words(head_size: int, bits: int, group: int) -> int:
    """int32 words of one (token, KV head) page cell: K and V codes plus float32 scale/zero per group."""
    if bits not in KV_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {KV_BITS}")
    if head_size % group:
        raise ValueError(f"head size {head_size} is not a multiple of the group size {group}")
    return 2 * packed_length(head_size, bits) + 4 * (head_size // group)


def pack_cells(k: torch.Tensor, v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize K and V (..., D) into page cells (..., cell_words) int32."""
    kp, ks, kz = kv_quantize(k, bits, group)
    vp, vs, vz = kv_quantize(v, bits, group)
    meta = torch.cat([ks, kz, vs, vz], dim=-1).contiguous().view(torch.int32)
    return torch.cat([kp, vp, meta], dim=-1)


def unpack_cells(cells: torch.Tensor, bits: int, head_size: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page cells (..., cell_words) -> dequantized (K, V), float32 (..., D) each (reference)."""
    wb, ng = packed_length(head_size, bits), head_size // group
    if cells.shape[-1] != 2 * wb + 4 * ng:
        raise ValueError(f"cells have {cells.shape[-1]} words, expected {2 * wb + 4 * ng} for head size "
                         f"{head_size} at {bits} bits")
    meta = cells[..., 2 * wb:].contiguous().view(torch.float32)
    out = []
    for i in range(2):
        codes = unpack_reference(cells[..., i * wb:(i + 1) * wb].contiguous(), bits, head_size).to(torch.float32)
        scale, zero = meta[..., 2 * i * ng:(2 * i + 1) * ng], meta[..., (2 * i + 1) * ng:(2 * i + 2) * ng]
        g = codes.reshape(*codes.shape[:-1], ng, group)
        out.append((g * scale[..., None] + zero[..., None]).reshape(codes.shape))
    return out[0], out[1]


def _check_pages(pages: torch.Tensor, head_size: int, bits: int, group: int) -> None:
    if pages.dtype != torch.int32 or pages.dim() != 4:
        raise ValueError(f"pages must be an int32 (blocks, heads, block_size, words) tensor, got "
                         f"{pages.dtype} {tuple(pages.shape)}")
    want = cell_words(head_size, bits, group)
    if pages.shape[-1] != want:
        raise ValueError(f"pages hold {pages.shape[-1]} words per cell, expected {want} "
                         f"(head size {head_size}, {bits} bits, group {group})")


def kv_cache_store(pages: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bits: int, group: int) -> None:
    """Quantize K/V of new tokens (N, H, D) and write their cells at ``slot_mapping`` (N,); slot < 0 skips."""
    _check_pages(pages, k.shape[-1], bits, group)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    if slot_mapping.numel() == 0:
        return
    bs = pages.shape[2]
    slots = slot_mapping.to(torch.long)
    cells = pack_cells(k, v, bits, group)  # (N, H, words)
    pages[slots // bs, :, slots % bs] = cells


def gather_cache(pages: torch.Tensor, block_row: torch.Tensor, length: int, bits: int, head_size: int, group: int,
                 fp_pool: torch.Tensor | None = None, fp_row: torch.Tensor | None = None, fp_from: int = 0,
                 sink: int = 0, sink_ok: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V float32 (H, length, D) of one row's first ``length`` cached positions (reference)."""
    h = pages.shape[1]
    if length == 0:
        z = torch.zeros(h, 0, head_size, dtype=torch.float32, device=pages.device)
        return z, z.clone()
    bs = pages.shape[2]
    pos = torch.arange(length, device=pages.device)
    blk = block_row.to(torch.long)[pos // bs]
    off = pos % bs
    cells = pages[blk, :, off]  # (L, H, words)
    k, v = unpack_cells(cells, bits, head_size, group)
    if fp_pool is not None and fp_row is not None:
        use = pos >= fp_from
        if sink_ok:
            use |= pos < sink
        if bool(use.any()):
            sl = fp_row.to(torch.long)[pos[use] // bs]
            if bool((sl < 0).any()):
                raise ValueError("a position marked full precision has no full-precision store slot")
            fp = fp_pool[sl, :, off[use]].to(torch.float32)  # (n, H, 2D)
            k[use], v[use] = fp[..., :head_size], fp[..., head_size:]
    return k.transpose(0, 1), v.transpose(0, 1)


def paged_kv_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pages: torch.Tensor,
                                 block_table: torch.Tensor, prev_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                 bits: int, group: int, scale: float, fp_pool: torch.Tensor | None = None,
                                 fp_block_table: torch.Tensor | None = None, fp_from: torch.Tensor | None = None,
                                 sink: int = 0, sink_ok: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of new tokens over the cached prefix and themselves; float32 math.

    q (N, Hq, D), k_new / v_new (N, Hk, D) with rows laid out by ``query_start_loc`` (R + 1,);
    row r attends to its ``prev_lens[r]`` cached positions (see module docstring) and to its own new
    tokens causally. Returns (N, Hq, D) in q's dtype.
    """
    n, hq, d = q.shape
    hk = k_new.shape[1]
    _check_pages(pages, d, bits, group)
    rep = hq // hk
    out = torch.empty(n, hq, d, dtype=torch.float32, device=q.device)
    qsl = query_start_loc.tolist()
    plens = prev_lens.tolist()
    for r in range(len(qsl) - 1):
        a, b = qsl[r], qsl[r + 1]
        if b == a:
            continue
        lp = plens[r]
        kc, vc = gather_cache(pages, block_table[r], lp, bits, d, group, fp_pool,
                              None if fp_block_table is None else fp_block_table[r],
                              lp if fp_from is None else int(fp_from[r]), sink,
                              bool(sink_ok[r]) if sink_ok is not None else False)
        kk = torch.cat([kc, k_new[a:b].transpose(0, 1).to(torch.float32)], dim=1)  # (Hk, lp + m, D)
        vv = torch.cat([vc, v_new[a:b].transpose(0, 1).to(torch.float32)], dim=1)
        qq = q[a:b].transpose(0, 1).to(torch.float32)  # (Hq, m, D)
        kk, vv = kk.repeat_interleave(rep, 0), vv.repeat_interleave(rep, 0)
        s = qq @ kk.transpose(1, 2) * scale  # (Hq, m, lp + m)
        m = b - a
        allowed = torch.arange(lp + m, device=q.device)[None, :] <= (lp + torch.arange(m, device=q.device))[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
        out[a:b] = (torch.softmax(s, dim=-1) @ vv).transpose(0, 1)
    return out.to(q.dtype)


def _decode_reference(q, k_new, v_new, pages, block_table, prev_lens, bits, group, scale, fp_pool, fp_block_table,
                      fp_from, sink, sink_ok):
    qsl = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_kv_attention_reference(q, k_new, v_new, pages, block_table, prev_lens, qsl, bits, group, scale,
                                        fp_pool, fp_block_table, fp_from, sink, sink_ok)


_DECODE = register_op(Op("kv_decode_attention", _decode_reference, "kv_attention:kv_decode_attention",
                         "decode attention reading PM-KVQ page cells (dequantize fused in the loop)"))


def kv_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pages: torch.Tensor,
                        block_table: torch.Tensor, prev_lens: torch.Tensor, bits: int, group: int, scale: float,
                        fp_pool: torch.Tensor | None = None, fp_block_table: torch.Tensor | None = None,
                        fp_from: torch.Tensor | None = None, sink: int = 0,
                        sink_ok: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row: q (R, Hq, D), k_new / v_new (R, Hk, D) -> (R, Hq, D).

    Row r attends to its ``prev_lens[r]`` cached positions and to its new token.
    """
    r, hq, d = q.shape
    if k_new.shape[0] != r or v_new.shape != k_new.shape or hq % k_new.shape[1]:
        raise ValueError(f"kv_decode_attention: q {tuple(q.shape)}, k_new {tuple(k_new.shape)}, "
                         f"v_new {tuple(v_new.shape)} do not fit (one token per row, GQA groups)")
    _check_pages(pages, d, bits, group)
    if (fp_pool is None) != (fp_block_table is None):
        raise ValueError("kv_decode_attention: fp_pool and fp_block_table go together")
    return _DECODE(q, k_new, v_new, pages, block_table, prev_lens, bits, group, scale, fp_pool, fp_block_table,
                   fp_from, sink, sink_ok, device=q.device)


def _host_list(x: torch.Tensor | Sequence[int]) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


def _prefill_row(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                 scale: float, chunk: int) -> torch.Tensor:
    """Causal attention of m new tokens (m, Hq, D) over lp cached (Hk, lp, D) + their own K/V; (m, Hq, D)."""
    m, hq, d = q.shape
    hk, lp = kc.shape[0], kc.shape[1]
    ct = q.dtype
    kk = torch.cat([kc.to(ct), k_new.transpose(0, 1).to(ct)], dim=1)  # (Hk, lp + m, D)
    vv = torch.cat([vc.to(ct), v_new.transpose(0, 1).to(ct)], dim=1)
    if hq != hk:
        kk, vv = kk.repeat_interleave(hq // hk, 0), vv.repeat_interleave(hq // hk, 0)
    qq = q.transpose(0, 1)  # (Hq, m, D)
    if lp == 0 and m <= chunk:  # a fresh prompt: plain causal attention (flash on CUDA)
        return F.scaled_dot_product_attention(qq[None], kk[None], vv[None], is_causal=True,
                                              scale=scale)[0].transpose(0, 1)
    out = torch.empty(hq, m, d, dtype=ct, device=q.device)
    for c0 in range(0, m, chunk):
        c1 = min(m, c0 + chunk)
        keys = lp + c1  # query lp + i sees keys [0, lp + i]
        allowed = (torch.arange(keys, device=q.device)[None, :]
                   <= (lp + torch.arange(c0, c1, device=q.device))[:, None])
        out[:, c0:c1] = F.scaled_dot_product_attention(qq[None, :, c0:c1], kk[None, :, :keys], vv[None, :, :keys],
                                                       attn_mask=allowed, scale=scale)[0]
    return out.transpose(0, 1)


def paged_kv_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pages: torch.Tensor,
                       block_table: torch.Tensor, prev_lens: torch.Tensor, query_start_loc: torch.Tensor | Sequence[int],
                       bits: int, group: int, scale: float, fp_pool: torch.Tensor | None = None,
                       fp_block_table: torch.Tensor | None = None, fp_from: torch.Tensor | None = None,
                       sink: int = 0, sink_ok: torch.Tensor | None = None, *,
                       host_prev_lens: Sequence[int] | None = None, chunk: int = 1024) -> torch.Tensor:
    """One engine step over PM-KVQ pages: any mix of decode and prefill rows (semantics of
    :func:`paged_kv_attention_reference`), in q's dtype.

    ``query_start_loc`` may be a host list (engines have it on the host; a tensor costs one copy);
    ``host_prev_lens`` likewise. Decode rows (one new token) run as one :func:`kv_decode_attention` call
    (the Triton kernel on CUDA); prefill rows dequantize their cached prefix (positions marked full
    precision come from the store) and run SDPA over queries in chunks of ``chunk`` rows.
    """
    n, hq, d = q.shape
    _check_pages(pages, d, bits, group)
    if (fp_pool is None) != (fp_block_table is None):
        raise ValueError("paged_kv_attention: fp_pool and fp_block_table go together")
    if chunk < 1:
        raise ValueError(f"paged_kv_attention: chunk must be >= 1, got {chunk}")
    qsl = _host_list(query_start_loc)
    rows = len(qsl) - 1
    if qsl[-1] != n or k_new.shape[0] != n or v_new.shape != k_new.shape or hq % k_new.shape[1]:
        raise ValueError(f"paged_kv_attention: q {tuple(q.shape)}, k_new {tuple(k_new.shape)}, v_new "
                         f"{tuple(v_new.shape)} do not fit query_start_loc ending at {qsl[-1]} (GQA groups)")
    qlens = [qsl[r + 1] - qsl[r] for r in range(rows)]
    dec = [r for r in range(rows) if qlens[r] == 1]
    pre = [r for r in range(rows) if qlens[r] > 1]
    if len(dec) == rows:  # pure decode step: no gather, no copy
        return kv_decode_attention(q, k_new, v_new, pages, block_table, prev_lens, bits, group, scale, fp_pool,
                                   fp_block_table, fp_from, sink, sink_ok)
    out = torch.empty_like(q)
    fp = fp_pool is not None
    if dec:
        ri = torch.tensor(dec, dtype=torch.long, device=q.device)
        ti = torch.tensor([qsl[r] for r in dec], dtype=torch.long, device=q.device)
        out[ti] = kv_decode_attention(q[ti], k_new[ti], v_new[ti], pages, block_table[ri], prev_lens[ri], bits,
                                      group, scale, fp_pool, fp_block_table[ri] if fp else None,
                                      None if fp_from is None else fp_from[ri], sink,
                                      None if sink_ok is None else sink_ok[ri])
    if pre:
        plens = _host_list(prev_lens if host_prev_lens is None else host_prev_lens)
        from_h = None if fp_from is None else _host_list(fp_from)
        sink_h = None if sink_ok is None else _host_list(sink_ok)
        for r in pre:
            a, b, lp = qsl[r], qsl[r + 1], plens[r]
            kc, vc = gather_cache(pages, block_table[r], lp, bits, d, group, fp_pool,
                                  fp_block_table[r] if fp else None, lp if from_h is None else from_h[r], sink,
                                  bool(sink_h[r]) if sink_h is not None else False)
            out[a:b] = _prefill_row(q[a:b], k_new[a:b], v_new[a:b], kc, vc, scale, chunk)
    return out

"""Kernel benchmarks: an op and its baselines timed in the same run, against measured ceilings.

    python -m overdrive.benchmarks.kernels [--op NAME ...] [--json OUT] [--quick]

For each case: median time of the op and of each baseline (CUDA events on GPU; ``perf_counter`` with
warm-up on CPU), the ratio baseline/op, and the achieved bandwidth and FLOP rate as a fraction of
ceilings measured in the same run: a device-to-device copy of a large buffer (bandwidth) and a large
matmul (compute; bf16 on GPU, fp32 on CPU where bf16 matmul is not what the hardware is built for).
Absolute numbers mean something only with the device name, which the JSON records.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from overdrive.kernels import int8_weight_linear, int8_weight_linear_reference, pack, unpack
from overdrive.kernels.dispatch import active_backend


# ----------------------------------------------------------------------------------- timing
def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``fn``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclasses.dataclass
class Ceilings:
    bandwidth_gbs: float   # bytes read + written per second by a large copy, GB/s
    flops: float           # large-matmul FLOP/s
    matmul_dtype: str


def measure_ceilings(device: torch.device, quick: bool = False) -> Ceilings:
    n = (64 if quick else 256) * 2**20 // 4 if device.type == "cpu" else 2**30 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats=5 if quick else 10)
    bw = 2 * src.numel() * 4 / t / 1e9
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = 8192 if device.type == "cuda" else (512 if quick else 1024)
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, repeats=5 if quick else 10)
    return Ceilings(bw, 2 * m**3 / t, str(dtype).removeprefix("torch."))


# ------------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Case:
    op: str
    shape: str
    fn: Callable[[], Any]
    baselines: dict[str, Callable[[], Any]]
    bytes_moved: int
    flops: int
    # optional: the (bytes, FLOPs) each baseline itself moves/computes, for its own achieved rates
    baseline_work: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded as is (e.g. FLOPs fraction)


def int8_linear_cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = [(1, 4096, 4096), (16, 4096, 4096), (512, 4096, 4096)] if device.type == "cuda" else \
        ([(1, 1024, 1024), (64, 1024, 1024)] if quick else [(1, 2048, 2048), (16, 2048, 2048), (256, 2048, 2048)])
    cases = []
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        q = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        s = torch.rand(n, device=device) / 50
        w_dense = (q.float() * s[:, None]).to(dtype)
        cases.append(Case(
            "int8_weight_linear", f"M={m} K={k} N={n} {str(dtype).removeprefix('torch.')}",
            lambda x=x, q=q, s=s: int8_weight_linear(x, q, s),
            {"dequantize+matmul": lambda x=x, q=q, s=s: int8_weight_linear_reference(x, q, s),
             "dense matmul (16/32-bit W)": lambda x=x, w=w_dense: x @ w.T},
            bytes_moved=n * k + m * k * x.element_size() + m * n * x.element_size() + n * 4,
            flops=2 * m * n * k))
    return cases


def group_linear_cases(device: torch.device, quick: bool) -> list[Case]:
    """MBQ W3/W4 group-128 dequant GEMV/GEMM at 7B-class layer shapes vs a 16-bit matmul."""
    from overdrive.kernels import group_linear_kn, prepare_group_weight
    from overdrive.kernels.packing import packed_length

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        layer_shapes = [(4096, 4096), (4096, 11008), (4096, 14336), (11008, 4096), (14336, 4096)]
        ms = (1, 4, 16, 256)
    else:  # CPU: the reference path at reduced sizes (a correctness fallback, see docs/benchmarks)
        layer_shapes = [(1024, 1024)] if quick else [(2048, 2048)]
        ms = (1, 16)
    cases = []
    for bits in (3, 4):
        for k, n in layer_shapes:
            qw = torch.randint(-2**31, 2**31 - 1, (n, packed_length(k, bits)), dtype=torch.int32, device=device)
            sc = (torch.rand(n, k // 128, device=device) / 50).to(dtype)
            zr = torch.randint(0, 1 << bits, (n, k // 128), dtype=torch.uint8, device=device)
            w16 = torch.randn(n, k, device=device, dtype=dtype)
            p = prepare_group_weight(qw, sc, zr, bits, 128)  # the kernel layout, made once at load time
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                weight_bytes = sum(t.numel() * t.element_size() for t in p.values())
                cases.append(Case(
                    "group_linear", f"W{bits} M={m} K={k} N={n}",
                    lambda x=x, p=p, bits=bits: group_linear_kn(x, p["qweight_kn"], p["scales_kn"], p["szeros_kn"],
                                                                bits, 128),
                    {f"{str(dtype).removeprefix('torch.')} matmul": lambda x=x, w=w16: x @ w.T},
                    bytes_moved=weight_bytes + (m * k + m * n) * x.element_size(), flops=2 * m * n * k))
    return cases


def act8_linear_cases(device: torch.device, quick: bool) -> list[Case]:
    """W8A8 / W4A8 int8 GEMM with fused per-token activation quantization vs a 16-bit matmul."""
    from overdrive.kernels import act8_linear
    from overdrive.kernels.packing import packed_length

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(4096, 4096), (4096, 11008)] if device.type == "cuda" else ([(512, 512)] if quick else [(1024, 1024)])
    ms = (1, 16, 256) if device.type == "cuda" else (1, 16)
    cases = []
    for wbits in (8, 4):
        for k, n in shapes:
            q = (torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device) if wbits == 8 else
                 torch.randint(-2**31, 2**31 - 1, (n, packed_length(k, 4)), dtype=torch.int32, device=device))
            ws = torch.rand(n, device=device) / 50
            w16 = torch.randn(n, k, device=device, dtype=dtype)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                cases.append(Case(
                    "act8_linear", f"W{wbits}A8 M={m} K={k} N={n}",
                    lambda x=x, q=q, ws=ws, wbits=wbits: act8_linear(x, q, ws, wbits),
                    {f"{str(dtype).removeprefix('torch.')} matmul": lambda x=x, w=w16: x @ w.T},
                    bytes_moved=q.numel() * q.element_size() + ws.numel() * 4 + (m * k + m * n) * x.element_size(),
                    flops=2 * m * n * k))
    return cases


def unpack_cases(device: torch.device, quick: bool) -> list[Case]:
    rows, cols = (4096, 4096) if device.type == "cuda" else ((256, 2048) if quick else (1024, 4096))
    cases = []
    for bits in (3, 4):
        codes = torch.randint(0, 1 << bits, (rows, cols))
        p = pack(codes, bits).to(device)
        copy_src = torch.empty(rows * cols, dtype=torch.uint8, device=device)
        copy_dst = torch.empty_like(copy_src)
        cases.append(Case(
            "unpack", f"{rows}x{cols} {bits}-bit",
            lambda p=p, bits=bits: unpack(p, bits, cols),
            {"uint8 copy of the output size": lambda: copy_dst.copy_(copy_src)},
            bytes_moved=p.numel() * 4 + rows * cols, flops=0))
    return cases


def _sdpa(device: torch.device) -> tuple[str, Callable[..., Any]]:
    """Dense SDPA baseline: PyTorch's flash backend on CUDA (forced), the default backend on CPU."""
    import torch.nn.functional as F

    if device.type != "cuda":
        return "SDPA dense", F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v):  # noqa: ANN001
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return "SDPA dense (flash)", flash


def window_attention_cases(device: torch.device, quick: bool) -> list[Case]:
    """DiTFastAttn band/arrow attention vs dense SDPA on the same tensors.

    FLOPs are those of the allowed pairs (:func:`attention_flops`, what the kernel must compute);
    SDPA's own rate is on the full S x S FLOPs. Half-widths: v1 windows N/8, N/16, N/32 without text;
    v2 arrow bands ceil(N_img / 2k) for k = 8, 16, 32 with full text rows/columns (text first, as in
    Flux's and CogVideoX's joint attention).
    """
    from overdrive.kernels import attention_flops, window_attention

    if device.type == "cuda":
        dtype = torch.bfloat16
        # (label, heads, head size, image tokens, text tokens (first), [(kind, divisor)]):
        # Flux-dev at 2048x2048; Wan2.1-14B 480p 81 frames (21 x 30 x 52 latent patches, no text in
        # self-attention); CogVideoX-5B 49 frames at 480x720 (13 x 30 x 45 patches + 226 text tokens)
        models = [("Flux 2K", 24, 128, 16384, 512, [("window", 8), ("window", 16), ("window", 32),
                                                     ("arrow", 8), ("arrow", 16), ("arrow", 32)]),
                  ("Wan 480p 81f", 40, 128, 21 * 30 * 52, 0, [("window", 8), ("window", 16), ("window", 32)]),
                  ("CogVideoX-5B 49f", 48, 64, 13 * 30 * 45, 226, [("arrow", 8), ("arrow", 16)])]
    else:
        dtype = torch.float32
        models = [("small", 2, 64, 512 if quick else 2048, 64, [("window", 8), ("arrow", 8)])]
    name, sdpa = _sdpa(device)
    cases = []
    for label, h, d, n_img, text, divs in models:
        s = n_img + text
        g = torch.Generator(device).manual_seed(s)
        q, k, v = (torch.randn(1, h, s, d, device=device, dtype=dtype, generator=g) for _ in range(3))
        full = 4 * h * s * s * d
        io = 4 * q.numel() * q.element_size()  # q, k, v read once, out written once
        for kind, f in divs:
            if kind == "window":  # v1: a plain band over every token (text handled like image tokens)
                w, t1, what = n_img // f, 0, f"window N/{f}"
            else:  # v2 arrow: band ceil(N_img / 2k), text rows/columns full
                w, t1, what = -(-n_img // (2 * f)), text, f"arrow k={f} (+{text} text)"
            win = torch.full((h,), w, dtype=torch.int32)
            fl = attention_flops(s, d, win, 0, t1)
            cases.append(Case(
                "window_attention", f"{label} S={s} H={h} {what}",
                lambda q=q, k=k, v=v, win=win, t1=t1: window_attention(q, k, v, win, 0, t1),
                {name: lambda q=q, k=k, v=v: sdpa(q, k, v)},
                bytes_moved=io, flops=fl, baseline_work={name: (io, full)},
                info={"half_width": w, "text_tokens": t1, "flops_fraction": fl / full,
                      "dtype": str(dtype).removeprefix("torch.")}))
    return cases


def kv_decode_cases(device: torch.device, quick: bool, shapes: list[tuple[int, int]] | None = None) -> list[Case]:
    """PM-KVQ paged decode attention (dequantize fused) at 8/4/2 bits vs bf16 SDPA decode.

    GQA 32 query / 8 KV heads, head 128 (Llama-3-8B-like), one query token per row, pages of 16
    tokens in a shuffled order. Bytes: the page cells of every cached position (codes + float32
    scale/zero), q, the new K/V and the output. Baseline: SDPA over contiguous bf16 K/V of the same
    length (no paging, no quantization), its bytes counted the same way.
    """
    from overdrive.kernels.kv_attention import cell_words, kv_decode_attention, pack_cells

    if device.type == "cuda":
        dtype, hq, hk, d, bs = torch.bfloat16, 32, 8, 128, 16
        shapes = shapes or [(16, 8192), (64, 4096), (4, 32768)]
        bit_list = (8, 4, 2)
    else:
        dtype, hq, hk, d, bs = torch.float32, 4, 2, 64, 16
        shapes = shapes or ([(2, 128)] if quick else [(4, 1024)])
        bit_list = (8, 4, 2) if quick else (8, 2)
    group = min(d, 128)
    sdpa_name, sdpa = _sdpa(device)
    sdpa_name = sdpa_name.replace(" dense", "")
    cases = []
    for rows, ctx in shapes:
        g = torch.Generator(device).manual_seed(rows * ctx)
        nb = rows * (-(-ctx // bs))
        k = torch.randn(nb * bs, hk, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(nb * bs, hk, d, device=device, dtype=dtype, generator=g)
        q = torch.randn(rows, hq, d, device=device, dtype=dtype, generator=g)
        kn = torch.randn(rows, hk, d, device=device, dtype=dtype, generator=g)
        vn = torch.randn(rows, hk, d, device=device, dtype=dtype, generator=g)
        perm = torch.randperm(nb, device=device, generator=g).to(torch.int32)
        table = perm.reshape(rows, -1)
        prev = torch.full((rows,), ctx, dtype=torch.int32, device=device)
        # bf16 SDPA decode over contiguous K/V of the same tokens (ctx cached + the new one)
        kd = torch.cat([k.reshape(rows, -1, hk, d)[:, :ctx], kn[:, None]], 1).transpose(1, 2).contiguous()
        vd = torch.cat([v.reshape(rows, -1, hk, d)[:, :ctx], vn[:, None]], 1).transpose(1, 2).contiguous()
        # GQA decode as grouped queries: the G query heads of KV head j are G query rows over its keys
        # (one position, so no mask); exact, and lets the flash backend run it without repeating K/V
        qd = q.reshape(rows, hk, hq // hk, d)
        small = 3 * rows * hq * d * q.element_size()
        base_bytes = kd.numel() * 2 * kd.element_size() + small
        base = f"{str(dtype).removeprefix('torch.')} {sdpa_name} decode (contiguous KV)"
        want = sdpa(qd, kd, vd).reshape(rows, hq, d).float()
        for bits in bit_list:
            # cells of token t (row-major over the shuffled blocks) land at page perm[t // bs]
            cells = pack_cells(k, v, bits, group).reshape(nb, bs, hk, -1).transpose(1, 2)
            pages = torch.empty_like(cells)
            pages[perm.long()] = cells
            pages = pages.contiguous()
            cw = cell_words(d, bits, group)
            got = kv_decode_attention(q, kn, vn, pages, table, prev, bits, group, d ** -0.5).float()
            diff = float((got - want).norm() / want.norm())  # quantization error (+ a layout check)
            byt = rows * ctx * hk * cw * 4 + table.numel() * 4 + small + 2 * rows * hk * d * q.element_size()
            cases.append(Case(
                "kv_decode_attention", f"{bits}-bit R={rows} ctx={ctx} Hq={hq} Hk={hk}",
                lambda q=q, kn=kn, vn=vn, pages=pages, table=table, prev=prev, bits=bits:
                    kv_decode_attention(q, kn, vn, pages, table, prev, bits, group, d ** -0.5),
                {base: lambda qd=qd, kd=kd, vd=vd: sdpa(qd, kd, vd)},
                bytes_moved=byt, flops=4 * rows * hq * (ctx + 1) * d,
                baseline_work={base: (base_bytes, 4 * rows * hq * (ctx + 1) * d)},
                info={"cell_bytes_per_token_head": cw * 4, "bf16_bytes_per_token_head": 2 * d * 2,
                      "block_size": bs, "group": group, "rel_diff_vs_baseline": diff}))
            del cells
    return cases


def _moa_like_spans(hk: int, ctx: int):
    """Per-KV-head elastic spans of a MoA-like plan (alphas around 0, betas 1/8 .. 1: mean density ~0.5 at
    ``ctx``), and a uniform fixed window (StreamingLLM) with the same number of positions read at ``ctx``."""
    from overdrive.contracts.kv_cache import HeadSpans

    betas = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    alphas = [ctx / 16, 0.0, -ctx / 32, ctx / 32, 0.0, -ctx / 16, 0.0, 0.0]
    moa = HeadSpans(tuple(alphas[h % 8] for h in range(hk)), tuple(betas[h % 8] for h in range(hk)), 128)
    mean_span = float(moa.spans(torch.tensor(ctx)).double().mean())
    return moa, HeadSpans((mean_span,) * hk, (0.0,) * hk, 128)


def span_attention_cases(device: torch.device, quick: bool) -> list[Case]:
    """MoA per-head span attention (sink 64 + per-head windows) vs dense SDPA, and vs a uniform sliding window
    (StreamingLLM) reading as many positions per query at the longest length.

    Prefill: ``span_prefill_attention`` over one fresh sequence (block-sparse; FLOPs = the pairs read).
    Decode: ``span_paged_attention``, one query per row over 16-token pages in a shuffled order; bytes = the
    sink + window positions each KV head reads (``span_kv_bytes_read``) vs the whole context for dense SDPA.
    GQA 32 query / 8 KV heads, head 128 (Llama-3-8B-like) on GPU.
    """
    from overdrive.kernels.span_attention import span_kv_bytes_read, span_paged_attention, span_prefill_attention

    if device.type == "cuda":
        dtype, hq, hk, d, bs = torch.bfloat16, 32, 8, 128, 16
        prefill, decode = [8192, 32768], [(16, 8192), (4, 32768)]
    else:
        dtype, hq, hk, d, bs = torch.float32, 4, 2, 64, 16
        prefill, decode = ([512] if quick else [2048]), ([(2, 512)] if quick else [(4, 2048)])
    sink = 64
    name, sdpa = _sdpa(device)
    el = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for n in prefill:
        g = torch.Generator(device).manual_seed(n)
        q = torch.randn(n, hq, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(n, hk, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(n, hk, d, device=device, dtype=dtype, generator=g)
        qd, kd, vd = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
        kd, vd = kd.repeat_interleave(hq // hk, 1), vd.repeat_interleave(hq // hk, 1)
        pos = torch.arange(1, n + 1, device=device)
        full = 2 * hq * n * (n + 1) * d  # causal pairs x (QK + PV) x 2
        io = 4 * q.numel() * el
        moa, window = _moa_like_spans(hk, n)
        for label, spans in (("MoA-like spans", moa), ("uniform window", window)):
            starts = spans.starts(pos, sink)
            read = int(spans.spans(pos).sum()) * (hq // hk)
            cases.append(Case(
                "span_prefill_attention", f"{label} N={n} Hq={hq} Hk={hk}",
                lambda q=q, k=k, v=v, starts=starts, n=n: span_prefill_attention(q, k, v, [0, n], starts, sink, d ** -0.5),
                {f"{name} causal": lambda: sdpa_causal(qd, kd, vd, sdpa)},
                bytes_moved=io, flops=4 * read * d, baseline_work={f"{name} causal": (io, full)},
                info={"density": read / (hq * n * (n + 1) / 2), "dtype": str(dtype).removeprefix("torch.")}))
    for rows, ctx in decode:
        g = torch.Generator(device).manual_seed(rows * ctx)
        nb = rows * (-(-ctx // bs))
        perm = torch.randperm(nb, device=device, generator=g).to(torch.int32)
        table = perm.reshape(rows, -1)
        pages_k = torch.randn(nb, hk, bs, d, device=device, dtype=dtype, generator=g)
        pages_v = torch.randn(nb, hk, bs, d, device=device, dtype=dtype, generator=g)
        q = torch.randn(rows, hq, d, device=device, dtype=dtype, generator=g)
        row = torch.arange(rows, device=device)
        pos = torch.full((rows,), ctx - 1, device=device)
        # dense baseline: SDPA over contiguous K/V of the same length, GQA as grouped queries
        kd = torch.randn(rows, hk, ctx, d, device=device, dtype=dtype, generator=g)
        vd = torch.randn(rows, hk, ctx, d, device=device, dtype=dtype, generator=g)
        qd = q.reshape(rows, hk, hq // hk, d)
        dense_bytes = 2 * kd.numel() * el
        moa, window = _moa_like_spans(hk, ctx)
        for label, spans in (("MoA-like spans", moa), ("uniform window", window)):
            starts = spans.starts(pos + 1, sink)
            byt = span_kv_bytes_read(pos, starts, sink, d, el)
            cases.append(Case(
                "span_paged_attention", f"decode {label} R={rows} ctx={ctx} Hq={hq} Hk={hk}",
                lambda q=q, starts=starts: span_paged_attention(q, pages_k, pages_v, table, row, pos, starts, sink,
                                                                d ** -0.5),
                {f"{name} decode (contiguous KV)": lambda: sdpa(qd, kd, vd)},
                bytes_moved=byt, flops=4 * hq * byt // (2 * d * el) * d,
                baseline_work={f"{name} decode (contiguous KV)": (dense_bytes, 4 * rows * hq * ctx * d)},
                info={"kv_bytes_per_token": byt / rows, "dense_kv_bytes_per_token": dense_bytes / rows,
                      "block_size": bs}))
    return cases


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa: Callable[..., Any]) -> torch.Tensor:
    import torch.nn.functional as F

    if sdpa is F.scaled_dot_product_attention:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def kv_quant_cases(device: torch.device, quick: bool) -> list[Case]:
    """PM-KVQ quantize (K/V tokens -> packed codes + scale/zero) and b -> b/2 requantize, vs the torch
    reference on the same device (on CPU the op *is* the reference: ratio ~1)."""
    from overdrive.kernels.kv_quant import kv_quantize, kv_quantize_reference, kv_requantize, kv_requantize_reference

    if device.type == "cuda":
        dtype, tokens, h, d = torch.bfloat16, 65536, 8, 128
    else:
        dtype, tokens, h, d = torch.float32, (256 if quick else 4096), 2, 64
    group = min(d, 128)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(tokens, h, d, device=device, dtype=dtype, generator=g)
    ng = d // group
    cases = []
    for bits in (8, 4, 2):
        words = tokens * h * (d * bits // 32)
        cases.append(Case(
            "kv_quantize", f"{bits}-bit T={tokens} H={h} D={d}",
            lambda bits=bits: kv_quantize(x, bits, group),
            {"torch reference": lambda bits=bits: kv_quantize_reference(x, bits, group)},
            bytes_moved=x.numel() * x.element_size() + words * 4 + tokens * h * ng * 8, flops=0))
    for bits in (16, 8, 4):
        p, s, _ = kv_quantize(x, bits, group)
        out_words = p.numel() // 2
        cases.append(Case(
            "kv_requantize", f"{bits}->{bits // 2}-bit T={tokens} H={h} D={d}",
            lambda p=p, s=s, bits=bits: kv_requantize(p, s, bits, d),
            {"torch reference": lambda p=p, s=s, bits=bits: kv_requantize_reference(p, s, bits, d)},
            bytes_moved=(p.numel() + out_words) * 4 + 2 * s.numel() * 4, flops=0))
    return cases


CASES = {"act8_linear": act8_linear_cases, "group_linear": group_linear_cases, "int8_weight_linear": int8_linear_cases,
         "kv_decode_attention": kv_decode_cases, "kv_quant": kv_quant_cases, "span_attention": span_attention_cases,
         "unpack": unpack_cases, "window_attention": window_attention_cases}


def run(ops: list[str], device: torch.device, quick: bool = False,
        case_options: dict[str, dict[str, Any]] | None = None,
        on_result: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Time every case of ``ops``; ``case_options[op]`` is passed to that op's case builder (e.g. the
    ``shapes`` of ``kv_decode_attention``); ``on_result`` is called with the results so far after each case."""
    ceil = measure_ceilings(device, quick)
    results = []
    for op in ops:
        for c in CASES[op](device, quick, **(case_options or {}).get(op, {})):
            t = time_fn(c.fn, device, repeats=5 if quick else 20)
            base = {name: time_fn(fn, device, repeats=5 if quick else 20) for name, fn in c.baselines.items()}
            results.append({
                "op": c.op, "shape": c.shape, "seconds": t,
                "speedup_vs": {name: bt / t for name, bt in base.items()},
                "baseline_seconds": base,
                "bandwidth_gbs": c.bytes_moved / t / 1e9,
                "bandwidth_of_ceiling": c.bytes_moved / t / 1e9 / ceil.bandwidth_gbs,
                "flops": c.flops / t if c.flops else None,
                "flops_of_ceiling": (c.flops / t) / ceil.flops if c.flops else None,
                **({"baseline_rates": {name: {"bandwidth_gbs": b / base[name] / 1e9, "flops": f / base[name] if f else None}
                                       for name, (b, f) in c.baseline_work.items()}} if c.baseline_work else {}),
                **c.info,
            })
            if on_result is not None:
                on_result(results)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    from overdrive.benchmarks import header

    return header("kernels", device, backend=active_backend(device), ceilings=dataclasses.asdict(ceil),
                  results=results)


def format_report(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    v = r["versions"]
    lines = [f"device: {r['device']}  torch {v.get('torch')}  triton {v.get('triton')}  backend: {r['backend']}  {r['date']}",
             f"ceilings (same run): copy {c['bandwidth_gbs']:.1f} GB/s, {c['matmul_dtype']} matmul {c['flops'] / 1e12:.3f} TFLOP/s",
             "", f"{'op':20s} {'shape':44s} {'time':>10s}  {'GB/s (of ceil)':>16s}  {'TFLOP/s (of ceil)':>18s}  speedup vs baselines"]
    for x in r["results"]:
        bw = f"{x['bandwidth_gbs']:.1f} ({x['bandwidth_of_ceiling']:.0%})"
        fl = f"{x['flops'] / 1e12:.3f} ({x['flops_of_ceiling']:.0%})" if x["flops"] else "-"
        sp = ", ".join(f"{k}: {v:.2f}x" for k, v in x["speedup_vs"].items())
        for k, br in x.get("baseline_rates", {}).items():
            sp += f" [{k}: {br['bandwidth_gbs']:.0f} GB/s" + (f", {br['flops'] / 1e12:.1f} TFLOP/s]" if br["flops"] else "]")
        if "flops_fraction" in x:
            sp += f" pairs {x['flops_fraction']:.3f}"
        lines.append(f"{x['op']:20s} {x['shape']:44s} {x['seconds'] * 1e3:8.3f}ms  {bw:>16s}  {fl:>18s}  {sp}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--op", nargs="*", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    args = ap.parse_args(argv)
    r = run(args.op, torch.device(args.device), args.quick)
    print(format_report(r))
    if args.json:
        from overdrive.benchmarks import write_json

        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

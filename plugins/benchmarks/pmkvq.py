"""PM-KVQ benchmark: bytes per token, decode-attention time vs a 16-bit cache, attention-output error vs peers.

    python -m overdrive.benchmarks.pmkvq --json docs/benchmarks/pmkvq-cpu-2026-11-22.json [--quick] [--vllm]

All in one run, on whatever device runs it (CUDA when available: the decode is the Triton kernel; CPU:
the torch reference). Imports no engine: transformers only for the fixture rows, vLLM only with --vllm.

1. **Bytes per token** per layer and KV head (closed form of each format) and, with ``--vllm``, the KV
   capacity two real vLLM servers report for the tiny Llama fixture at equal ``VLLM_CPU_KVCACHE_SPACE``
   (no plan vs a PM-KVQ plan).
2. **Decode attention time** of ``overdrive.kernels.kv_attention.kv_decode_attention`` at 8/4/2 bits
   (compressed pages + a full-precision sink and 128-token window, as the vLLM backend runs it) against
   a 16-bit (bf16) cache, same shapes, measured interleaved (one call of each variant per round, median
   over rounds) so that load from other processes hits all variants alike. Baseline on CPU: the same
   paged decode in torch over bf16 pages; on CUDA: SDPA (flash) decode over contiguous bf16 K/V (no
   paging, a lower bound for a paged bf16 kernel). Ratios = baseline time / PM-KVQ time (> 1: faster);
   achieved bandwidth = bytes of the cache the step must read / time, with the device's copy bandwidth
   from the same run on CUDA. On CUDA each kernel's output is also compared with the torch reference on
   the same pages (``..._rel_diff_vs_reference``); a variant that raises is recorded (``..._error``) and
   left out of the timing, so one failure does not lose the run.
3. **Attention-output error** of the last 64 queries against a float64 reference on two data sets —
   synthetic keys with outlier channels, and the tiny fixture's own layer-0 q/k/v under positional
   interpolation — for PM-KVQ 8/4/2 (with and without the key-scale search, searched on another
   sample), a KIVI-style 2-bit cache (keys per channel over groups of 32 tokens, values per token over
   groups of 32 channels, the last 128 tokens at full precision) and fp8 e4m3 KV as vLLM stores it
   (``--kv-cache-dtype fp8``: a cast with one scale per tensor; scale 1.0 is vLLM's default without
   calibrated scales, amax/448 a calibrated one), emulated with torch's float8 cast. Two metrics:

   * ``rel_l2`` = ||O_hat - O||_F / ||O||_F over all (query, head) output rows;
   * ``err_vs_value_rms`` = RMS over output rows of ||o_hat - o|| divided by the RMS norm of the value
     vectors: the error in units of one value vector. An attention output is a convex combination of
     values, so this stays O(1) when ``rel_l2`` is inflated by a small reference: when attention
     spreads over many zero-mean values, ||O|| is far below a value's norm (``output_rms_vs_value_rms``
     records the ratio; ``rel_l2 = err_vs_value_rms / output_rms_vs_value_rms``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from overdrive.benchmarks import header, write_json
from overdrive.kernels.dispatch import active_backend
from overdrive.kernels.kv_attention import (cell_words, kv_cache_store, kv_decode_attention,
                                            paged_kv_attention_reference)

from overdrive.pmkvq.calibrate import pair_max, qdq, search_alpha, scales_for


# ------------------------------------------------------------------------------------- formats
def bytes_per_token(head_size: int = 128, group: int = 128) -> dict[str, float]:
    """Bytes of one token's K and V for one KV head."""
    d = head_size
    out = {"bf16 (vLLM default)": 2 * d * 2.0, "fp8 e4m3 (vLLM)": 2 * d * 1.0}
    for b in (8, 4, 2):
        out[f"pmkvq {b}-bit"] = 4.0 * cell_words(d, b, group)
    # KIVI-2: 2-bit codes; keys: fp16 scale+zero per channel per 32 tokens; values: fp16 scale+zero per 32 channels
    out["kivi 2-bit (body)"] = 2 * d * 2 / 8 + (2 * 2 * d / 32) + (2 * 2 * d / 32)
    return out


# ------------------------------------------------------------------------------------ peers
def kivi_qdq(k: torch.Tensor, v: torch.Tensor, bits: int = 2, group: int = 32, residual: int = 128
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI-style: keys per channel over groups of ``group`` tokens, values per token over groups of channels;
    the last ``residual`` tokens (and the incomplete key group) stay at full precision. k/v (H, T, D)."""
    h, t, d = k.shape
    n_q = max(t - residual, 0) // group * group
    kq, vq = k.clone(), v.clone()
    if n_q:
        kg = k[:, :n_q].reshape(h, n_q // group, group, d)
        lo, hi = kg.amin(2, keepdim=True), kg.amax(2, keepdim=True)
        s = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
        kq[:, :n_q] = (torch.round((kg - lo) / s) * s + lo).reshape(h, n_q, d)
        vg = v[:, :n_q].reshape(h, n_q, d // group, group)
        lo, hi = vg.amin(-1, keepdim=True), vg.amax(-1, keepdim=True)
        s = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
        vq[:, :n_q] = (torch.round((vg - lo) / s) * s + lo).reshape(h, n_q, d)
    return kq, vq


def fp8_qdq(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale


def pmkvq_qdq(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, sink: int = 1, window: int = 128,
              s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache PM-KVQ attends to after t tokens: sink and window exact, body at ``bits`` (k/v (H, T, D)).
    With ``s`` (H, D) the body stores K / s and the query is multiplied by s (returned K is K_q / s * s)."""
    h, t, d = k.shape
    body_end = sink + window * ((t - sink) // window) if t > sink else t
    kq, vq = k.clone(), v.clone()
    if body_end > sink:
        kb = k[:, sink:body_end]
        if s is not None:
            kq[:, sink:body_end] = qdq(kb / s[:, None, :], bits, group) * s[:, None, :]
        else:
            kq[:, sink:body_end] = qdq(kb, bits, group)
        vq[:, sink:body_end] = qdq(v[:, sink:body_end], bits, group)
    return kq, vq


def attn_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Last q.shape[1] positions attend causally; q (Hq, m, D), k/v (Hk, T, D), float64."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(rep, 0), v.double().repeat_interleave(rep, 0)
    m, t = q.shape[1], k.shape[1]
    sc = q.double() @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    allowed = torch.arange(t)[None, :] <= (t - m + torch.arange(m))[:, None]
    return torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1) @ v


def errors(out: torch.Tensor, ref: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """``rel_l2`` and ``err_vs_value_rms`` (module docstring) of outputs (H, m, D) against ``ref``; v (Hk, T, D)."""
    diff = (out - ref).double()
    v_rms = float(v.double().pow(2).sum(-1).mean().sqrt())
    return {"rel_l2": float(diff.norm() / ref.double().norm()),
            "err_vs_value_rms": float(diff.pow(2).sum(-1).mean().sqrt()) / v_rms}


def error_table(q, k, v, group: int, q_cal, k_cal, v_cal) -> dict[str, Any]:
    """Errors of the last 64 queries of (q, k, v); key scales searched on the other sample (q_cal, ...)."""
    q = q[:, -64:]
    ref = attn_out(q, k, v)
    v_rms = float(v.double().pow(2).sum(-1).mean().sqrt())
    table: dict[str, Any] = {}
    maxk = pair_max(k_cal.abs().amax(dim=1))  # (H, D) from the calibration sample
    alpha, _, _ = search_alpha(q_cal[None], k_cal[None], v_cal[None], maxk, group)
    s = scales_for(maxk, alpha) if alpha > 0 else None
    for b in (8, 4, 2):
        kq, vq = pmkvq_qdq(k, v, b, group)
        table[f"pmkvq {b}-bit"] = errors(attn_out(q, kq, vq), ref, v)
        if s is not None:
            kq, vq = pmkvq_qdq(k, v, b, group, s=s)
            table[f"pmkvq {b}-bit + key scales (alpha {alpha})"] = errors(attn_out(q, kq, vq), ref, v)
    kq, vq = kivi_qdq(k, v, 2)
    table["kivi 2-bit (residual 128)"] = errors(attn_out(q, kq, vq), ref, v)
    table["fp8 e4m3, scale 1.0 (vLLM default)"] = errors(attn_out(q, fp8_qdq(k, 1.0), fp8_qdq(v, 1.0)), ref, v)
    ks, vs = float(k.abs().max()) / 448, float(v.abs().max()) / 448
    table["fp8 e4m3, scale amax/448"] = errors(attn_out(q, fp8_qdq(k, ks), fp8_qdq(v, vs)), ref, v)
    return {"output_rms_vs_value_rms": float(ref.pow(2).sum(-1).mean().sqrt()) / v_rms,
            "key_scale_alpha": alpha, "errors": table}


def synthetic(t: int, hq: int, hk: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys with a few large rotary-pair channels (as in LLM keys), values and queries Gaussian. The
    channel magnitudes are a fixed property of the "model" (seed 1234); ``seed`` draws the tokens."""
    gm = torch.Generator().manual_seed(1234)
    mag = torch.exp(torch.randn(hk, d // 2, generator=gm) * 0.5)
    out_idx = torch.randperm(d // 2, generator=gm)[: max(1, d // 32)]
    mag[:, out_idx] *= 12
    mag = torch.cat([mag, mag], -1)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hk, t, d, generator=g) * mag[:, None, :]
    v = torch.randn(hk, t, d, generator=g)
    q = torch.randn(hq, t, d, generator=g) * mag.repeat_interleave(hq // hk, 0)[:, None, :].rsqrt()
    return q, k, v


def fixture_kv(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer-0 q/k/v of the tiny Llama fixture over t tokens of built-in text, positions stretched 4x."""
    from overdrive.contracts.llm_calibration import load_for_calibration
    from overdrive.pmkvq.calibrate import position_ids_for, token_batches
    from overdrive.testing import tiny_llama

    run = load_for_calibration(tiny_llama(), device="cpu", dtype="float32")
    ids = token_batches(run.tokenizer, t, 1, 1, None)[0]
    ids = torch.roll(ids, seed * 7, dims=1)
    seen = []
    block = next(run.blocks([{"input_ids": ids, "position_ids": position_ids_for(t, 4 * t, 1)}]))
    block.run(attention=lambda call: seen.append((call.query, call.key, call.value)))
    run.close()
    q, k, v = seen[0]
    return q[0].float(), k[0].float(), v[0].float()


# ------------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int = 1
                ) -> dict[str, float]:
    """Median seconds per call of each function, calling each once per round (CUDA: events)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                f()
                end.record()
                torch.cuda.synchronize(device)
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def dense_paged_decode(q, k_new, v_new, kp, vp, table, lens):
    """The same paged decode over a dense 16-bit cache in torch: gather blocks, upcast, attend (CPU baseline)."""
    r, hq, d = q.shape
    bs = kp.shape[2]
    out = torch.empty(r, hq, d, dtype=torch.float32, device=q.device)
    for i in range(r):
        n = int(lens[i])
        pos = torch.arange(n, device=q.device)
        blk = table[i].long()[pos // bs]
        k = torch.cat([kp[blk, :, pos % bs].float(), k_new[i:i + 1].float()]).transpose(0, 1)
        v = torch.cat([vp[blk, :, pos % bs].float(), v_new[i:i + 1].float()]).transpose(0, 1)
        rep = hq // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = (q[i][:, None, :].float() @ k.transpose(1, 2)) / d ** 0.5
        out[i] = (torch.softmax(s, -1) @ v)[:, 0]
    return out


def sdpa_decode(q, kd, vd):
    """bf16 SDPA decode over contiguous K/V (R, Hk, T, D): the G query heads of a KV head are G query rows."""
    import torch.nn.functional as F

    r, hq, d = q.shape
    qd = q.reshape(r, kd.shape[1], hq // kd.shape[1], d)
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qd, kd, vd)
    return F.scaled_dot_product_attention(qd, kd, vd)


def timing(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    hq, hk, d, bs, win, sink = 32, 8, 128, 16, 128, 1
    if cuda:
        shapes, rounds = [(16, 8192), (4, 32768)], 50
    else:
        shapes, rounds = ([(4, 1024)] if quick else [(4, 1024), (4, 4096)]), (3 if quick else 5)
    results = []
    for rows, ctx in shapes:
        g = torch.Generator(device).manual_seed(rows * ctx)
        nb = rows * ctx // bs
        table = torch.randperm(nb, generator=g, device=device).to(torch.int32).reshape(rows, ctx // bs)
        lens = torch.full((rows,), ctx, dtype=torch.int32, device=device)
        k = torch.randn(nb, hk, bs, d, generator=g, device=device, dtype=torch.bfloat16)
        v = torch.randn(nb, hk, bs, d, generator=g, device=device, dtype=torch.bfloat16)
        q = torch.randn(rows, hq, d, generator=g, device=device, dtype=torch.bfloat16)
        kn = torch.randn(rows, hk, d, generator=g, device=device, dtype=torch.bfloat16)
        vn = torch.randn(rows, hk, d, generator=g, device=device, dtype=torch.bfloat16)
        fns: dict[str, Callable[[], Any]] = {}
        small = 3 * rows * hq * d * 2  # q, new K/V and the output (bf16)
        read = {"bf16": rows * ctx * hk * 2 * d * 2 + small}
        if cuda:
            logical = table.reshape(-1).long()  # physical block of each (row, i), in logical order
            kd = torch.cat([k[logical].reshape(rows, ctx // bs, hk, bs, d).permute(0, 2, 1, 3, 4).reshape(rows, hk, ctx, d),
                            kn[:, :, None]], 2).contiguous()
            vd = torch.cat([v[logical].reshape(rows, ctx // bs, hk, bs, d).permute(0, 2, 1, 3, 4).reshape(rows, hk, ctx, d),
                            vn[:, :, None]], 2).contiguous()
            fns["bf16"] = lambda: sdpa_decode(q, kd, vd)
            baseline = "bf16 SDPA (flash) decode over contiguous K/V"
        else:
            fns["bf16"] = lambda: dense_paged_decode(q, kn, vn, k, v, table, lens)
            baseline = "bf16 paged decode in torch (gather, upcast, attend)"
        # full-precision sink + 128-token window per row, in a store addressed per block (the vLLM runtime's layout;
        # random contents: this part times the read path, the error tables above measure accuracy)
        fp_from = lens - win
        fbt = torch.full((rows, ctx // bs), -1, dtype=torch.int32)
        nxt = 0
        for i in range(rows):
            for j in [0, *range((ctx - win) // bs, ctx // bs)]:
                fbt[i, j] = nxt
                nxt += 1
        fbt = fbt.to(device)
        pool = torch.randn(nxt, hk, bs, 2 * d, generator=g, device=device, dtype=torch.bfloat16)
        sink_ok = torch.ones(rows, dtype=torch.int32, device=device)
        flat_k = k.permute(0, 2, 1, 3).reshape(-1, hk, d)
        flat_v = v.permute(0, 2, 1, 3).reshape(-1, hk, d)
        pages_of: dict[int, torch.Tensor] = {}
        for b in (8, 4, 2):
            cw = cell_words(d, b, 128)
            pages = pages_of[b] = torch.zeros(nb, hk, bs, cw, dtype=torch.int32, device=device)
            kv_cache_store(pages, torch.arange(nb * bs, device=device), flat_k, flat_v, b, 128)
            fns[f"pmkvq {b}-bit"] = (lambda pages=pages, b=b: kv_decode_attention(
                q, kn, vn, pages, table, lens, b, 128, d ** -0.5, pool, fbt, fp_from, sink, sink_ok))
            # compressed cells of positions [sink, ctx - win), the store for the sink and the window
            read[f"pmkvq {b}-bit"] = rows * hk * ((ctx - win - sink) * cw * 4 + (win + sink) * 2 * d * 2) + small
        case: dict[str, Any] = {"rows": rows, "q_heads": hq, "kv_heads": hk, "head_size": d, "block": bs, "context": ctx,
                                "window": win, "sink": sink, "rounds": rounds, "baseline": baseline,
                                "pmkvq_backend": active_backend(device)}
        for b in (8, 4, 2):
            name = f"pmkvq {b}-bit"
            try:  # one call first: a kernel failure is recorded and the rest of the run goes on
                got = fns[name]()
                if cuda:  # the kernel (with the full-precision store) against the torch reference on the same data
                    ref = paged_kv_attention_reference(
                        q, kn, vn, pages_of[b], table, lens, torch.arange(rows + 1, device=device), b, 128,
                        d ** -0.5, pool, fbt, fp_from, sink, sink_ok).float()
                    case[f"pmkvq_{b}bit_rel_diff_vs_reference"] = float((got.float() - ref).norm() / ref.norm())
            except Exception as e:  # noqa: BLE001
                case[f"pmkvq_{b}bit_error"] = f"{type(e).__name__}: {e}"
                del fns[name]
        t = interleaved(fns, device, rounds)
        for name, sec in t.items():
            key = name.replace(" ", "_").replace("-", "")
            case[f"{key}_s"] = sec
            case[f"{key}_bytes_read"] = read[name]
            case[f"{key}_GBps"] = read[name] / sec / 1e9
            if name != "bf16":
                case[f"{key}_speedup_vs_bf16"] = t["bf16"] / sec
        results.append(case)
    return results



def prefill_timing(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    """Steps with prefill rows, as the vLLM backend runs them: ``paged_kv_attention`` (decode rows through the
    decode kernel, prefill rows through chunked SDPA over the dequantized prefix) vs the float32 reference
    (one score matrix per row), on the same 4-bit pages, interleaved. ``reference_score_bytes``: the
    reference's (heads x new x length) float32 score matrix (it also keeps a masked copy and the softmax);
    ``chunked_score_bytes``: the most one chunk's scores could take if SDPA fell back to its math kernel
    (its flash / memory-efficient kernels do not materialise them)."""
    from overdrive.kernels.kv_attention import paged_kv_attention

    cuda = device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    hq, hk, d, bs, bits, chunk = 32, 8, 128, 16, 4, 1024
    if cuda:
        cases, rounds = [("fresh prompt", [0], [8192]), ("chunked prefill + 32 decodes", [8192] + [4096] * 32,
                                                                  [2048] + [1] * 32)], 10
    elif quick:
        cases, rounds = [("fresh prompt", [0], [512]), ("chunked prefill + 4 decodes", [512] * 5, [256, 1, 1, 1, 1])], 2
    else:
        cases, rounds = [("fresh prompt", [0], [2048]), ("chunked prefill + 8 decodes", [3584] + [2048] * 8,
                                                                  [512] + [1] * 8)], 3
    results = []
    for label, cached, new in cases:
        g = torch.Generator(device).manual_seed(len(cached))
        nbr = [-(-(c + n) // bs) for c, n in zip(cached, new)]
        nb = sum(nbr)
        table = torch.full((len(cached), max(nbr)), -1, dtype=torch.int32)
        perm, at = torch.randperm(nb).to(torch.int32), 0
        for r, k in enumerate(nbr):
            table[r, :k], at = perm[at:at + k], at + k
        table = table.to(device)
        pages = torch.zeros(nb, hk, bs, cell_words(d, bits, 128), dtype=torch.int32, device=device)
        kv_cache_store(pages, torch.arange(nb * bs, device=device),
                       torch.randn(nb * bs, hk, d, generator=g, device=device, dtype=dt),
                       torch.randn(nb * bs, hk, d, generator=g, device=device, dtype=dt), bits, 128)
        n = sum(new)
        q = torch.randn(n, hq, d, generator=g, device=device, dtype=dt)
        kn = torch.randn(n, hk, d, generator=g, device=device, dtype=dt)
        vn = torch.randn(n, hk, d, generator=g, device=device, dtype=dt)
        qsl = [0]
        for m in new:
            qsl.append(qsl[-1] + m)
        prev = torch.tensor(cached, dtype=torch.int32, device=device)
        qsl_t = torch.tensor(qsl, device=device)
        fns = {"reference": lambda: paged_kv_attention_reference(q, kn, vn, pages, table, prev, qsl_t, bits, 128,
                                                                 d ** -0.5),
               "paged_kv_attention": lambda: paged_kv_attention(q, kn, vn, pages, table, prev, qsl, bits, 128,
                                                                d ** -0.5, host_prev_lens=cached, chunk=chunk)}
        case: dict[str, Any] = {"case": label, "q_heads": hq, "kv_heads": hk, "head_size": d, "bits": bits,
                                "dtype": str(dt).replace("torch.", ""), "cached": cached[:2], "new": new[:2],
                                "rows": len(cached), "chunk": chunk, "rounds": rounds,
                                "backend": active_backend(device)}
        got, ref = fns["paged_kv_attention"]().float(), fns["reference"]().float()
        case["rel_diff_vs_reference"] = float((got - ref).norm() / ref.norm())
        t = interleaved(fns, device, rounds)
        case.update({f"{k}_s": v for k, v in t.items()})
        case["speedup_vs_reference"] = t["reference"] / t["paged_kv_attention"]
        case["reference_score_bytes"] = max(4 * hq * m * (c + m) for c, m in zip(cached, new))
        case["chunked_score_bytes"] = max(4 * hq * min(m, chunk) * (c + m) for c, m in zip(cached, new) if m > 1)
        results.append(case)
    return results

# ------------------------------------------------------------------------------------ capacity
def vllm_capacity(tmp: Path) -> dict[str, Any]:
    """KV capacity two real vLLM servers report for the fixture (no plan vs a [4, 2]-bit plan), same space."""
    import subprocess

    from overdrive.testing import tiny_llama
    from overdrive.testing.vllm_server import VllmServer

    from overdrive.pmkvq.config import PMKVQPlan

    plan = tmp / "plan.json"
    subprocess.run([sys.executable, "-m", "overdrive.cli", "calibrate", "--method", "pmkvq", "--model", str(tiny_llama()),
                    "--output", str(plan), "--budget", "55000B", "--max-len", "256", "--window", "16", "--samples", "2",
                    "--seq-len", "64"], check=True, capture_output=True)
    args = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--block-size", "32"]
    out: dict[str, Any] = {"plan_bits": PMKVQPlan.load(plan).layer_bits, "VLLM_CPU_KVCACHE_SPACE_GiB": 1}
    for name, extra in (("no plan", []), ("pmkvq", ["--additional-config", json.dumps({"pmkvq": {"plan": str(plan)}})])):
        with VllmServer(tiny_llama(), args + extra, log_path=tmp / f"vllm-{name.replace(' ', '_')}.log") as srv:
            out[f"{name} tokens"] = srv.kv_cache_tokens()
    out["ratio"] = out["pmkvq tokens"] / out["no plan tokens"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.pmkvq", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the report here (atomically)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a CPU smoke run)")
    p.add_argument("--vllm", action="store_true", help="also start two vLLM servers for the capacity check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        **header("pmkvq", device), "command": "python -m overdrive.benchmarks.pmkvq " + " ".join(sys.argv[1:] if argv is None else argv),
        "metrics": {
            "rel_l2": "||O_hat - O||_F / ||O||_F over the last 64 queries x all query heads, float64 reference",
            "err_vs_value_rms": "RMS over output rows of ||o_hat - o||, divided by the RMS norm of the value vectors",
            "output_rms_vs_value_rms": "RMS norm of the reference output rows / RMS norm of the value vectors "
                                       "(rel_l2 = err_vs_value_rms / this)",
            "speedup_vs_bf16": "baseline time / PM-KVQ time, interleaved medians in this run (> 1: PM-KVQ faster)",
            "GBps": "bytes of the cache (and q/new K/V/output) the decode step must read or write / time"},
        "bytes_per_token_per_kv_head_d128": bytes_per_token(128),
        "bytes_per_token_per_kv_head_d32": bytes_per_token(32, 32)}
    if device.type == "cuda":
        from overdrive.benchmarks.kernels import measure_ceilings

        c = measure_ceilings(device)
        report["copy_bandwidth_GBps"] = c.bandwidth_gbs
    errs: dict[str, Any] = {}
    cal = synthetic(1024, 32, 8, 128, seed=1)
    t = 1024 if args.quick else 4096
    errs[f"synthetic outlier keys, T={t}, Hq=32, Hk=8, D=128"] = error_table(*synthetic(t, 32, 8, 128, seed=0), 128,
                                                                             *cal)
    try:
        fx_cal = fixture_kv(256, seed=1)
        errs["tiny Llama fixture layer 0, T=512 (positions x4), Hq=4, Hk=2, D=32"] = error_table(
            *fixture_kv(512, seed=0), 32, *fx_cal)
    except Exception as e:  # noqa: BLE001 - e.g. no transformers/tokenizers on a GPU box: record, keep the rest
        errs["tiny Llama fixture"] = {"error": f"{type(e).__name__}: {e}"}
    report["attention_output_error"] = errs
    report["decode_attention_time"] = timing(args.quick, device)
    report["prefill_step_time"] = prefill_timing(args.quick, device)
    if args.vllm:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report["vllm_kv_capacity_tiny_llama"] = vllm_capacity(Path(tmp))
    report["wall_s"] = time.perf_counter() - t0
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

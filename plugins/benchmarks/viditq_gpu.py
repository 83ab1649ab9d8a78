"""ViDiT-Q W8A8 / W4A8 vs bf16 on a Flux-width denoiser, for a GPU (the issue's goal: >= 1.4x at W8A8).

    python -m overdrive.benchmarks.viditq_gpu [--json OUT.json] [--quick] [--double 2 --single 4]

Denoiser: ``FluxTransformer2DModel`` at FLUX.1 width (24 heads x 128 = 3072, text 4096, pooled 768,
64 latent channels), random weights, ``--double`` double-stream and ``--single`` single-stream
blocks (FLUX.1 has 19 + 38; fewer keep the run short: the per-block cost is what changes), one
1024x1024 image = 4096 image tokens + 512 text tokens, batch 1, bf16 activations.

Measured in one process:

1. the denoiser forward in bf16 (median of ``--iters`` after warm-up, CUDA-synchronised);
2. the same model with every linear layer inside the blocks replaced by ViDiT-Q W8A8, then W4A8
   (round to nearest, one range, no balancing: ViDiT-Q's W8A8 plan; the hook layer attached as in a
   pipeline), forward time, its speed-up over bf16 and the output's relative L2 error;
3. per linear shape of the model (M = 4608 tokens): bf16 ``F.linear`` vs overdrive's fused Triton
   ``act8_linear`` vs "torch per-token quantization + ``torch._int_mm`` + epilogue" (:func:`int_mm_linear`),
   to pick the faster int8 path per shape;
4. parameter bytes of the blocks and peak allocated GPU memory.

``--quick`` runs a small model on whatever device there is (CPU: the torch reference), which is how
the script is tested without a GPU; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import overdrive.diffusers as odd
from overdrive.kernels import act8_linear

FLUX_WIDTH = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
QUICK = dict(patch_size=1, in_channels=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def int_mm_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None = None,
                  smooth: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 with torch ops: per-token int8 quantization (fp32, as act8_linear), ``torch._int_mm``, epilogue.
    The same arithmetic as ``act8_linear(..., wbits=8)``; ``torch._int_mm`` needs M > 16 on CUDA."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if smooth is not None:
        x2 = x2 / smooth.float()
    sx = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    v = x2 / sx
    xq = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, qweight.t())
    y = acc.float() * sx * wscale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    def median_s(fn: Callable[[], Any], iters: int) -> float:
        fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    return median_s


def _inputs(cfg: dict, tokens: int, text: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, tokens, cfg["in_channels"], generator=g).to(device, dtype),
            "encoder_hidden_states": torch.randn(1, text, cfg["joint_attention_dim"], generator=g).to(device, dtype),
            "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
            "timestep": torch.tensor([0.5], device=device, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, device=device), "txt_ids": torch.zeros(text, 3, device=device),
            "return_dict": False}


def run(quick: bool, double: int, single: int, iters: int, device: str | None = None) -> dict[str, Any]:
    """The report (shared header first); ``device`` defaults to the GPU when there is one."""
    from diffusers import FluxTransformer2DModel

    from overdrive.benchmarks import header
    from overdrive.viditq.runtime import quantize_in_place

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(QUICK if quick else FLUX_WIDTH, num_layers=double, num_single_layers=single)
    tokens, text = (64, 16) if quick else (4096, 512)
    median_s = _timer(device)
    inputs = _inputs(cfg, tokens, text, device, dtype)
    res: dict[str, Any] = header("viditq-gpu", device, config=cfg, image_tokens=tokens, text_tokens=text,
                                 dtype=str(dtype), denoiser={}, linear=[],
                                 **({} if device.type == "cuda" else {"note": "CPU: a check of the script only"}))
    base_out = None
    for scheme in ("bf16", "w8a8", "w4a8"):
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device (a Flux-width model on CPU takes long)
            model = FluxTransformer2DModel(**cfg).to(dtype).eval()
        if scheme != "bf16":
            quantize_in_place(model, odd.denoiser_info(model), scheme)
            odd.enable(model, "viditq")
        blocks = sum(p.numel() * p.element_size() for bl in ("transformer_blocks", "single_transformer_blocks")
                     for p in getattr(model, bl).parameters())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = model(**inputs)[0]
            s = median_s(lambda: model(**inputs), iters)
        entry = {"forward_s": round(s, 5), "block_param_bytes": blocks}
        if device.type == "cuda":
            entry["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if base_out is None:
            base_out = out.float()
        else:
            entry["speedup_vs_bf16"] = round(res["denoiser"]["bf16"]["forward_s"] / s, 3)
            entry["rel_l2_vs_bf16"] = round(float((out.float() - base_out).norm() / base_out.norm()), 5)
        res["denoiser"][scheme] = entry
        print(scheme, entry, flush=True)
        odd.disable(model)
        del model
    dim = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    m = tokens + text
    shapes = sorted({(dim, dim), (dim, 4 * dim), (4 * dim, dim), (5 * dim, dim), (dim, 6 * dim)})
    for k, n in shapes:
        g = torch.Generator().manual_seed(k + n)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype)
        from overdrive.viditq.quant import quantize_weight

        qw, ws = quantize_weight(w, 8)
        qw, ws = qw.to(device), ws.to(device)
        row = {"M": m, "K": k, "N": n, "bf16_s": median_s(lambda: F.linear(x, w, b), iters),
               "act8_triton_s": median_s(lambda: act8_linear(x, qw, ws, 8, b), iters)}
        if device.type == "cuda":  # torch._int_mm on CPU is a slow reference loop
            row["int_mm_s"] = median_s(lambda: int_mm_linear(x, qw, ws, b), iters)
        res["linear"].append({k2: (round(v, 7) if isinstance(v, float) else v) for k2, v in row.items()})
        print(res["linear"][-1], flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = p.parse_args(argv)
    res = run(args.quick, args.double, args.single, args.iters, args.device)
    if args.json:
        from overdrive.config import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

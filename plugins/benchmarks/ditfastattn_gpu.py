"""DiTFastAttn on a CUDA GPU: the window/arrow kernel against SDPA, and a Flux transformer end to end.

    python -m overdrive.benchmarks.ditfastattn_gpu kernel --json OUT.json
    python -m overdrive.benchmarks.ditfastattn_gpu e2e --json OUT.json [--double 4 --single 8 --steps 10]
    python -m overdrive.benchmarks.ditfastattn_gpu e2e --tiny          # CPU smoke run of the script itself

``kernel``: bf16, head_dim 128. 2K Flux image (16384 image + 512 text tokens, 24 heads) with arrow
bands k = 8/16/32 and v1 windows N/8, N/16 (no text); a Wan-480p-sized video self-attention (81
frames -> 21 x 30 x 52 = 32760 tokens, 40 heads) with bands N/16 and N/32. Timed with CUDA events
(``triton.testing.do_bench``, median), against ``F.scaled_dot_product_attention`` (PyTorch's flash
backend) on the same tensors in the same run; TFLOP/s counted on the pairs each computes; error vs
an fp32 reference with the same mask on a slice of queries. Both GPU paths are timed: overdrive's
Triton kernel (what ``window_attention`` runs on CUDA) and FlexAttention with a cached block mask.

``e2e``: a FluxPipeline whose transformer has Flux-dev's real widths (3072 hidden, 24 x 128 heads,
4096-d T5 and 768-d pooled inputs) but fewer blocks (default 4 double + 8 single, of 19 + 38), random
bf16 weights, at 16384 image + 512 text tokens (a 2048 x 2048 image's token count; the tiny VAE has
scale factor 1, so 256 x 256 latent pixels), ``--steps`` FlowMatch Euler steps, latents out. Rows: no
acceleration; uniform strategies (arrow k, WA-RS, AST); v1 and v2 plans calibrated on one prompt
embedding and run on another. Wall clock of the whole denoising loop (CUDA-synchronised, median of
repeats), attention FLOPs fraction from the attachment's counters, relative error of the final
latents. Random weights: the error says how far the computation moves, not image quality.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from overdrive.benchmarks import header, write_json


def _env(name: str) -> dict[str, Any]:
    dev = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return header(name, sms=dev.multi_processor_count if dev else None)


def _mask_ref(q, k, v, w, t0, t1, rows):
    """fp32 attention for query rows ``rows`` under the band/arrow mask (the definition)."""
    s = q.shape[-2]
    i = rows[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    text_i = (i >= t0) & (i < t1)
    text_j = (j >= t0) & (j < t1)
    out = []
    for h in range(q.shape[1]):
        allowed = ((i - j).abs() <= int(w[h])) | text_i | text_j
        logits = (q[:, h, rows].float() @ k[:, h].float().transpose(-1, -2)) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        out.append(torch.softmax(logits, -1) @ v[:, h].float())
    return torch.stack(out, 1)


def kernel_cases(quick: bool = False) -> list[dict[str, Any]]:
    from overdrive.ditfastattn.plan import band_for

    if quick:  # a smoke run of the harness (CPU: the torch reference)
        return [dict(name="tiny arrow k=8", h=2, s=256 + 32, t0=0, t1=32, w=band_for(8, 256)),
                dict(name="tiny window N/8 (v1, no text)", h=2, s=256, t0=0, t1=0, w=256 // 8)]
    n_img, text = 16384, 512
    cases = [dict(name=f"Flux 2K arrow k={k}", h=24, s=n_img + text, t0=0, t1=text, w=band_for(k, n_img))
             for k in (8, 16, 32)]
    cases += [dict(name=f"Flux 2K window N/{f} (v1, no text)", h=24, s=n_img, t0=0, t1=0, w=n_img // f)
              for f in (8, 16)]
    n_vid = 21 * 30 * 52
    cases += [dict(name=f"Wan 480p 81 frames window N/{f}", h=40, s=n_vid, t0=0, t1=0, w=n_vid // f) for f in (16, 32)]
    return cases


def run_kernel(device: str = "cuda", quick: bool = False, flex: bool = True) -> dict[str, Any]:
    """The kernel table. ``flex=False`` skips FlexAttention (its first call compiles for over a minute);
    ``quick`` runs tiny cases, on CPU through the dispatched torch reference timed with ``perf_counter``."""
    from overdrive.kernels import attention_flops
    from overdrive.kernels.window_attention import flex_window_attention

    dev = torch.device(device)
    if dev.type == "cuda":
        import triton.testing

        from overdrive.kernels.dispatch import load_triton_module

        triton_window_attention = load_triton_module("window_attention", interpret=False).window_attention

        def bench(fn: Any) -> float:  # milliseconds
            return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        dtype = torch.bfloat16
    else:
        from overdrive.benchmarks.kernels import time_fn
        from overdrive.kernels import window_attention as triton_window_attention  # the dispatched op (reference)

        def bench(fn: Any) -> float:
            return time_fn(fn, dev, repeats=3, warmup=1) * 1e3
        dtype = torch.float32
    hd = 32 if quick else 128
    rows = []
    for c in kernel_cases(quick):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, c["h"], c["s"], hd, device=dev, dtype=dtype) for _ in range(3))
        w = torch.full((c["h"],), c["w"], device=dev, dtype=torch.int32)
        out = triton_window_attention(q, k, v, w, c["t0"], c["t1"])
        assert torch.isfinite(out).all(), f"{c['name']}: non-finite output"
        sel = torch.randint(0, c["s"], (256,), device=dev)
        ref = _mask_ref(q[:, :4], k[:, :4], v[:, :4], w[:4], c["t0"], c["t1"], sel)
        err = float((out[:, :4, sel].float() - ref).norm() / ref.norm())
        t_win = bench(lambda: triton_window_attention(q, k, v, w, c["t0"], c["t1"]))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        t_flex = flex_first_s = flex_err = None
        if flex:
            try:
                t = time.perf_counter()
                flex_out = flex_window_attention(q, k, v, w, c["t0"], c["t1"])
                torch.cuda.synchronize()
                flex_first_s = time.perf_counter() - t
                flex_err = float((flex_out[:, :4, sel].float() - ref).norm() / ref.norm())
                t_flex = bench(lambda: flex_window_attention(q, k, v, w, c["t0"], c["t1"]))
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                print(f"FlexAttention failed on {c['name']}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                t_flex = flex_first_s = flex_err = None
        fl_win = attention_flops(c["s"], hd, w.cpu(), c["t0"], c["t1"])
        fl_full = 4 * c["h"] * c["s"] * c["s"] * hd
        rows.append({**c, "flops_fraction": fl_win / fl_full, "triton_ms": t_win, "sdpa_ms": t_sdpa,
                     "flex_block_mask_ms": t_flex, "flex_first_call_s": flex_first_s, "flex_rel_err_vs_fp32": flex_err,
                     "flex_speedup_vs_sdpa": (t_sdpa / t_flex) if t_flex else None,
                     "triton_speedup_vs_sdpa": t_sdpa / t_win, "triton_tflops": fl_win / t_win / 1e9,
                     "sdpa_tflops": fl_full / t_sdpa / 1e9, "rel_err_vs_fp32": err})
        print(f"{c['name']:34s} pairs {fl_win / fl_full:6.3f}  triton {t_win:8.3f} ms  sdpa {t_sdpa:8.3f} ms  "
              f"x{t_sdpa / t_win:5.2f}  {fl_win / t_win / 1e9:6.1f} vs {fl_full / t_sdpa / 1e9:6.1f} TFLOP/s  err {err:.1e}  "
              f"flex {t_flex if t_flex is None else round(t_flex, 3)} ms",
              flush=True)
        q = k = v = out = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {**_env("ditfastattn-gpu-kernels"), "head_dim": hd, "dtype": str(dtype), "rows": rows}


# ------------------------------------------------------------------------------------------- e2e
def build(double: int, single: int, tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    import diffusers

    if tiny:
        cfg = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                   axes_dims_rope=[4, 6, 6])
    else:
        cfg = dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=[16, 56, 56])
    torch.manual_seed(0)
    with torch.device(device):
        tr = diffusers.FluxTransformer2DModel(**cfg).to(dtype).eval()
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                                      norm_num_groups=1, latent_channels=16, use_quant_conv=False,
                                      use_post_quant_conv=False).to(dtype).eval()
    pipe = diffusers.FluxPipeline(transformer=tr, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                  text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, cfg


def run_e2e(double: int, single: int, steps: int, tiny: bool, repeats: int,
            only: list[str] | None = None) -> dict[str, Any]:
    """The end-to-end table; ``only`` keeps the named configurations (``none`` always runs: the reference),
    and plans are calibrated only for the calibrated rows kept."""
    import tempfile

    import overdrive.diffusers as odd

    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.set_grad_enabled(False)
    pipe, cfg = build(double, single, tiny, device, dtype)
    size = 16 if tiny else 256
    text, jd, pd = (8, 32, 16) if tiny else (512, 4096, 768)

    def call(seed: int) -> dict[str, Any]:
        g = torch.Generator(device).manual_seed(seed)
        return dict(prompt_embeds=torch.randn(1, text, jd, generator=g, device=device, dtype=dtype),
                    pooled_prompt_embeds=torch.randn(1, pd, generator=g, device=device, dtype=dtype),
                    height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                    generator=torch.Generator(device).manual_seed(seed))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    tmp = Path(tempfile.mkdtemp())
    plans = {}
    calib_s = {}
    for variant, val in (("v2", 0.2), ("v1", 0.1)):
        name = f"calibrated {variant} ({'alpha' if variant == 'v2' else 'threshold'} {val})"
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        plan = odd.calibrate(pipe, "ditfastattn", dict(variant=variant, threshold=val, alpha=val), **call(100))
        calib_s[variant] = time.perf_counter() - t0
        plans[name] = str(plan.save(tmp / f"{variant}.json"))
        print(f"calibrated {variant} in {calib_s[variant]:.1f} s: predicted FLOPs "
              f"{plan.meta['predicted_attention_flops_fraction']:.3f}", flush=True)
    configs: dict[str, dict[str, Any] | None] = {"none": None}
    for k in (8, 16, 32):
        configs[f"arrow k={k} (all heads, steps >= 1)"] = dict(strategy="arrow", arrow_k=k)
    configs["wars N/8 (steps >= 1)"] = dict(strategy="wars")
    configs["ast (steps >= 1)"] = dict(strategy="ast")
    for name, path in plans.items():
        configs[name] = dict(plan=path)
    if only is not None:
        configs = {k: v for k, v in configs.items() if k == "none" or k in only}
    rows = []
    ref = None
    base_s = None
    for name, opts in configs.items():
        att = odd.enable(pipe, "ditfastattn", **opts) if opts else None
        try:
            pipe(**call(1))  # warm-up (kernel compilation)
            times = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                lat = pipe(**call(1))[0]
                sync()
                times.append(time.perf_counter() - t0)
        finally:
            if att is not None:
                odd.disable(pipe)
        med = statistics.median(times)
        if ref is None:
            ref, base_s = lat.float(), med
        err = float((lat.float() - ref).norm() / ref.norm())
        frac = att.flops_fraction if att is not None else 1.0
        rows.append({"config": name, "seconds": times, "median_s": med, "speedup": base_s / med,
                     "attention_flops_fraction": frac, "latent_rel_err": err})
        print(f"{name:40s} {med:8.3f} s  x{base_s / med:5.2f}  attn FLOPs {frac:6.3f}  latent err {err:.2e}", flush=True)
    return {**_env("ditfastattn-gpu-pipeline"), "transformer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "image_tokens": (size // 2) ** 2, "text_tokens": text, "steps": steps, "dtype": str(dtype),
            "calibration_seconds": calib_s, "rows": rows,
            "note": "random weights; fewer blocks than Flux-dev (widths real); latent error is not image quality"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("kernel", "e2e"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true", help="kernel: skip FlexAttention (compiles for over a minute)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of the e2e script (not a measurement)")
    args = ap.parse_args(argv)
    r = run_kernel(flex=not args.no_flex) if args.what == "kernel" else run_e2e(args.double, args.single, args.steps, args.tiny, args.repeats)
    if args.json:
        write_json(args.json, r, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

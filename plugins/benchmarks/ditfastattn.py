"""DiTFastAttn v1/v2 against Diffusers' own caches, measured in one run on one pipeline.

    python -m overdrive.benchmarks.ditfastattn [--json OUT.json] [--png OUT.png] [--quick]

Pipeline: Flux (FluxPipeline, FlowMatch Euler) with a random-weight transformer sized so that attention
dominates the denoiser's cost at 128x128 pixels = 4096 image tokens + 12 text tokens (4 heads x 32,
2 double + 4 single blocks, 6 attention modules), a random tiny VAE, 6 steps. Calibration uses one
prompt embedding (seed 100); evaluation uses two others (seeds 1, 2), so the plans are reused across
prompts as in deployment.

Configurations: no acceleration; DiTFastAttn v1 at three thresholds and v2 at three alphas; Diffusers'
FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer and MagCache (ratios calibrated
by MagCache's own calibration mode on the calibration prompt).

Columns: attention FLOPs fraction (DiTFastAttn: its exact counters; peers: FLOPs of the SDPA calls
they let through, counted by a TorchFunctionMode, over the unaccelerated count), wall-clock of the
denoising loop relative to no acceleration (same process, runs interleaved), PSNR and SSIM of the
decoded images against the unaccelerated images of the same prompt, and the relative L2 error of the
final latents (more sensitive than the images after the random VAE).

Random weights: the images are structured noise, so PSNR/SSIM here measure how far each method moves
the output of *this* network, not whether a trained model's image stays good; they rank methods by
fidelity to the unaccelerated computation, nothing more.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import overdrive.diffusers as odd
from overdrive.benchmarks import header, write_json

from overdrive.metrics import psnr, ssim

BENCH_FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[8, 8, 16])
QUICK_FLUX = dict(BENCH_FLUX, num_layers=1, num_single_layers=1)


class SDPAFlops(TorchFunctionMode):
    """Counts the FLOPs (4 B H Sq Sk D) of every scaled_dot_product_attention call made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            *batch, sq, d = q.shape
            n = 1
            for x in batch:
                n *= x
            self.flops += 4 * n * sq * k.shape[-2] * d
        return func(*args, **kwargs)


def build(quick: bool) -> Any:
    import diffusers

    from overdrive.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")
    torch.manual_seed(7)
    pipe.register_modules(transformer=diffusers.FluxTransformer2DModel(**(QUICK_FLUX if quick else BENCH_FLUX)).eval())
    return pipe


def inputs(seed: int, size: int, steps: int) -> dict[str, Any]:
    from overdrive.testing import pipeline_inputs

    return pipeline_inputs("flux", seed=seed, num_inference_steps=steps, height=size, width=size, output_type="latent")


def decode(pipe: Any, latents: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        lat = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        img = pipe.vae.decode(lat, return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pt")


def magcache_ratios(pipe: Any, call: dict[str, Any], steps: int) -> list[float]:
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            pipe(**call)
    finally:
        pipe.transformer.disable_cache()
    m = re.search(r"\[([-0-9.,eE\s]+)\]", buf.getvalue())
    if not m:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[-500:]}")
    return [float(x) for x in m.group(1).split(",")]


def peer_configs(pipe: Any, steps: int, mag_ratios: list[float]) -> dict[str, Any]:
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)

    ts = lambda: pipe.current_timestep  # noqa: E731  (the pipelines' documented callback)
    return {
        "FirstBlockCache 0.2": FirstBlockCacheConfig(threshold=0.2),
        "FirstBlockCache 0.6": FirstBlockCacheConfig(threshold=0.6),
        "PyramidAttentionBroadcast skip 2": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1000),
            current_timestep_callback=ts),
        "FasterCache skip 2": FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1000),
            current_timestep_callback=ts, is_guidance_distilled=True, tensor_format="BFCHW"),
        "TaylorSeer interval 2": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                       taylor_factors_dtype=torch.float32),
        "MagCache 0.1": MagCacheConfig(threshold=0.1, max_skip_steps=2, retention_ratio=0.2,
                                       num_inference_steps=steps, mag_ratios=mag_ratios),
    }


def run(quick: bool = False) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    size, steps = (32, 4) if quick else (128, 6)
    pipe = build(quick)
    # fresh inputs for every call: they carry a torch.Generator, which each call advances
    calib_call = lambda: inputs(100, size, steps)  # noqa: E731
    evals = (1, 2)
    setups: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {"none": (lambda: None, lambda: None)}
    calib_s: dict[str, float] = {}
    plans: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ditfastattn-bench-"))
    for variant, values in (("v1", (0.05, 0.1, 0.2)), ("v2", (0.05, 0.2, 0.8))):
        for v in values:
            name = f"DiTFastAttn {variant} {'threshold' if variant == 'v1' else 'alpha'} {v}"
            t0 = time.perf_counter()
            plan = odd.calibrate(pipe, "ditfastattn", dict(variant=variant, threshold=v, alpha=v), **calib_call())
            calib_s[name] = time.perf_counter() - t0
            path = plan.save(tmp / f"{variant}-{v}.json")
            plans[name] = {"predicted_flops_fraction": plan.meta["predicted_attention_flops_fraction"],
                           "steps": plan.to_dict()["steps"]}
            setups[name] = (lambda p=str(path): odd.enable(pipe, "ditfastattn", plan=p), lambda: odd.disable(pipe))
    mag = magcache_ratios(pipe, calib_call(), steps)
    for name, cfg in peer_configs(pipe, steps, mag).items():
        setups[name] = (lambda c=cfg: pipe.transformer.enable_cache(c), lambda: pipe.transformer.disable_cache())

    results: dict[str, dict[str, Any]] = {n: {"seconds": [], "psnr": [], "ssim": [], "latent": []} for n in setups}
    ref_latents, ref_images, full_flops = [], [], []
    order = list(setups)
    for rep, seed in enumerate(evals):
        # none first (the reference), then every configuration, then none again (drift check)
        for name in order + ["none"]:
            enable, disable = setups[name]
            att = enable()
            counter = SDPAFlops()
            t0 = time.perf_counter()
            try:
                with counter:
                    latents = pipe(**inputs(seed, size, steps))[0]
            finally:
                disable()
            dt = time.perf_counter() - t0
            r = results[name]
            r["seconds"].append(dt)
            if name == "none" and len(ref_latents) == rep:
                ref_latents.append(latents)
                ref_images.append(decode(pipe, latents, size))
                full_flops.append(counter.flops)
                continue
            if name == "none":
                continue
            img = decode(pipe, latents, size)
            r["psnr"].append(psnr(img, ref_images[rep]))
            r["ssim"].append(ssim(img, ref_images[rep]))
            r["latent"].append(float((latents - ref_latents[rep]).norm() / ref_latents[rep].norm()))
            frac = att.flops_fraction if att is not None and hasattr(att, "flops_fraction") else counter.flops / full_flops[rep]
            r.setdefault("flops_fraction", []).append(frac)
    none_s = statistics.median(results["none"]["seconds"])
    rows = []
    for name in order:
        r = results[name]
        rows.append({
            "method": name,
            "attention_flops_fraction": round(statistics.mean(r.get("flops_fraction", [1.0])), 4),
            "wall_clock_ratio": round(statistics.median(r["seconds"]) / none_s, 3),
            "seconds": [round(s, 3) for s in r["seconds"]],
            "psnr_db": round(statistics.mean(r["psnr"]), 2) if r["psnr"] else None,
            "ssim": round(statistics.mean(r["ssim"]), 4) if r["ssim"] else None,
            "latent_rel_err": float(f"{statistics.mean(r['latent']):.3g}") if r["latent"] else 0.0,
            **({"calibration_seconds": round(calib_s[name], 1)} if name in calib_s else {}),
        })
    tr = pipe.transformer
    return {
        **header("ditfastattn", "cpu"),
        "pipeline": {"class": type(pipe).__name__, "transformer": dict(tr.config), "height": size, "width": size,
                     "image_tokens": (size // 2) ** 2, "text_tokens": 12, "steps": steps,
                     "calibration_prompt_seed": 100, "eval_prompt_seeds": [1, 2]},
        "note": "random weights: PSNR/SSIM measure fidelity to the unaccelerated network's output, not image quality",
        "none_seconds": [round(s, 3) for s in results["none"]["seconds"]],
        "rows": rows,
        "plans": plans,
        "magcache_ratios": [round(x, 4) for x in mag],
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['device']}, torch {r['versions']['torch']}, diffusers {r['versions']['diffusers']}, {r['pipeline']['image_tokens']} image tokens, "
             f"{r['pipeline']['steps']} steps; none: {r['none_seconds']} s",
             f"{'method':38s} {'attn FLOPs':>10s} {'wall':>6s} {'PSNR dB':>8s} {'SSIM':>7s} {'latent err':>10s}"]
    for row in r["rows"]:
        ps = "inf" if row["psnr_db"] in (None, float("inf")) else f"{row['psnr_db']:.2f}"
        lines.append(f"{row['method']:38s} {row['attention_flops_fraction']:10.3f} {row['wall_clock_ratio']:6.3f} "
                     f"{ps:>8s} {row['ssim'] if row['ssim'] is not None else '-':>7} {row['latent_rel_err']:10.3g}")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """Two Pareto panels drawn with Pillow: PSNR vs attention FLOPs fraction and vs wall-clock ratio."""
    from PIL import Image, ImageDraw

    W, H, M = 1200, 560, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    rows = [x for x in r["rows"] if x["psnr_db"] not in (None, float("inf"))]
    ys = [x["psnr_db"] for x in rows]
    y0, y1 = (min(ys) - 2, max(ys) + 2) if ys else (0, 1)
    colors = {"DiTFastAttn v1": (200, 30, 30), "DiTFastAttn v2": (30, 90, 200)}
    pw = (W - 3 * M) // 2
    for p, (key, label) in enumerate((("attention_flops_fraction", "attention FLOPs fraction"),
                                      ("wall_clock_ratio", "wall-clock ratio to no acceleration"))):
        ox = M + p * (pw + M)
        d.rectangle([ox, M, ox + pw, H - M], outline="black")
        for i in range(6):
            xv = i / 5 * 1.2
            x = ox + xv / 1.2 * pw
            d.line([x, H - M, x, H - M + 5], fill="black")
            d.text((x - 8, H - M + 8), f"{xv:.2f}", fill="black")
            yv = y0 + i / 5 * (y1 - y0)
            y = H - M - i / 5 * (H - 2 * M)
            d.line([ox - 5, y, ox, y], fill="black")
            d.text((ox - 45, y - 6), f"{yv:.1f}", fill="black")
        d.text((ox + pw // 2 - 90, H - M + 28), label, fill="black")
        d.text((ox - 60, M - 30), "PSNR vs unaccelerated (dB)", fill="black")
        for x in rows:
            col = next((c for k, c in colors.items() if x["method"].startswith(k)), (20, 140, 60))
            px = ox + min(x[key], 1.2) / 1.2 * pw
            py = H - M - (x["psnr_db"] - y0) / (y1 - y0) * (H - 2 * M)
            d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=col)
            d.text((px + 7, py - 6), x["method"].replace("DiTFastAttn ", "").replace("threshold ", "t").replace("alpha ", "a"),
                   fill=col)
    d.text((M, 15), f"DiTFastAttn v1 (red), v2 (blue), Diffusers caches (green): {r['pipeline']['image_tokens']} image "
                    f"tokens, {r['pipeline']['steps']} steps, random weights, {r['device']}, {r['date']}", fill="black")
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a measurement)")
    args = ap.parse_args(argv)
    r = run(args.quick)
    if args.json:
        write_json(args.json, r, indent=1)
    if args.png:
        plot(r, args.png)
    print(format_report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

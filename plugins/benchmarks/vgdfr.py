"""VGDFR against the unmodified pipeline, DiTFastAttn and Diffusers' own caches, measured in one run.

    python -m overdrive.benchmarks.vgdfr [--json OUT.json] [--quick] [--device cuda --dtype bfloat16]
                                    [--size 128 --frames 81 --steps 10 --compress-step 2]

Pipeline: Wan (WanPipeline, FlowMatch Euler, classifier-free guidance: two denoiser calls per step)
with a random-weight transformer (6 blocks, 4 heads x 64, FFN 1024) and the tiny random Wan VAE:
81 frames (21 latent frames) of 128 x 128 pixels = 64 tokens per latent frame, 1344 vision tokens,
10 steps. Two prompt embeddings (seeds 1, 2); every configuration runs each once,
interleaved, with the unaccelerated pipeline first (the reference) and last (drift).

Configurations: no acceleration; VGDFR at keep ratios 0.9 / 0.75 / 0.6 / 0.5 (compaction after 2 of
10 steps, SSIM of x̂0 decoded at half size, latent merge, the paper's original-position blocks mapped
onto this depth), VGDFR 0.75 with the pixel re-encode merge and with the schedule scored on x̂0
latents (no estimate decode); DiTFastAttn (plan-less AST and a v1 plan
calibrated on seed 100); VGDFR 0.75 combined with DiTFastAttn AST; Diffusers' FirstBlockCache,
PyramidAttentionBroadcast, TaylorSeer and MagCache (ratios from its own calibration mode).

Columns: tokens (denoiser calls x vision tokens, relative to no acceleration), attention FLOPs
(counted on every scaled_dot_product_attention call, relative), wall clock of the denoising loop
(pipeline start to the last step's callback, which includes VGDFR's estimate decode) and of the
decode + frame restoration after it, both relative to no acceleration, PSNR and SSIM of the decoded
frames against the unaccelerated frames of the same prompt.

Random weights: the videos are structured noise, so PSNR/SSIM measure how far each method moves the
output of *this* network, not whether a trained model's video stays good. VGDFR's schedule picks
chunks by SSIM of x̂0 frames, which here carry no real motion, so its choice of chunks is arbitrary;
the keep ratio it reaches is what it controls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import overdrive.diffusers as odd
from overdrive.benchmarks import header, write_json
from overdrive.benchmarks.ditfastattn import SDPAFlops, magcache_ratios
from overdrive.metrics import psnr, ssim

BENCH_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
                 text_dim=32, freq_dim=256, ffn_dim=1024, num_layers=6, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
QUICK_WAN = dict(BENCH_WAN, attention_head_dim=32, num_layers=2, ffn_dim=128)
KEEP_RATIOS = (0.9, 0.75, 0.6, 0.5)


# Wan2.1-1.3B's widths (12 heads x 128, FFN 8960, RoPE 1024) with the tiny pipeline's 32-d text embeddings;
# the number of blocks is the caller's (the real model has 30)
WAN_1_3B_WIDTHS = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, rope_max_seq_len=1024)


def build(quick: bool, device: str, dtype: torch.dtype, transformer: dict[str, Any] | None = None) -> Any:
    """The Wan pipeline; ``transformer`` overrides entries of the transformer's config."""
    import diffusers

    from overdrive.testing import tiny_pipeline

    pipe = tiny_pipeline("wan")
    torch.manual_seed(7)
    cfg = {**(QUICK_WAN if quick else BENCH_WAN), **(transformer or {})}
    with torch.device(device):  # random init on the device (fast for Wan-width models on a GPU)
        tr = diffusers.WanTransformer3DModel(**cfg).eval()
    pipe.register_modules(transformer=tr)
    pipe.transformer.to(dtype)
    pipe.to(device)
    return pipe


def inputs(seed: int, size: int, frames: int, steps: int, device: str, **kw: Any) -> dict[str, Any]:
    from overdrive.testing import pipeline_inputs

    call = pipeline_inputs("wan", seed=seed, num_inference_steps=steps, height=size, width=size, num_frames=frames,
                           output_type="pt", **kw)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in call.items()}


def peer_configs(pipe: Any, steps: int, mag_ratios: list[float]) -> dict[str, Any]:
    from diffusers import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)

    return {
        "FirstBlockCache 0.2": FirstBlockCacheConfig(threshold=0.2),
        "PyramidAttentionBroadcast skip 2": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1000),
            current_timestep_callback=lambda: pipe.current_timestep),
        "TaylorSeer interval 2": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                       taylor_factors_dtype=torch.float32),
        "MagCache 0.1": MagCacheConfig(threshold=0.1, max_skip_steps=2, retention_ratio=0.2,
                                       num_inference_steps=steps, mag_ratios=mag_ratios),
    }


Setup = tuple[Callable[[], Any], Callable[[], None]]


def setups(pipe: Any, steps: int, compress: int, calib_call: Callable[[], dict], tmp: Path,
           only: list[str] | None = None) -> dict[str, Setup]:
    """name -> (enable, disable); enable returns what to call instead of the pipeline (or None). ``only``
    keeps the named configurations ("none" always) and skips the calibrations the others need."""
    want = (lambda name: True) if only is None else (lambda name: name == "none" or name in only)  # noqa: E731
    out: dict[str, Setup] = {"none": (lambda: None, lambda: None)}
    vg = dict(compress_step=compress)
    for r in KEEP_RATIOS:
        out[f"VGDFR keep {r}"] = (lambda r=r: odd.enable(pipe, "vgdfr", keep_ratio=r, **vg), lambda: odd.disable(pipe))
    out["VGDFR keep 0.75, pixel merge"] = (lambda: odd.enable(pipe, "vgdfr", keep_ratio=0.75, merge="pixels", **vg),
                                           lambda: odd.disable(pipe))
    out["VGDFR keep 0.75, latent estimate"] = (
        lambda: odd.enable(pipe, "vgdfr", keep_ratio=0.75, estimate="latents", **vg), lambda: odd.disable(pipe))
    out["DiTFastAttn AST (plan-less)"] = (lambda: (odd.enable(pipe, "ditfastattn", strategy="ast"), None)[1],
                                          lambda: odd.disable(pipe))
    if want("DiTFastAttn v1 plan t0.1"):
        plan = odd.calibrate(pipe, "ditfastattn", dict(variant="v1", threshold=0.1), **calib_call())
        path = plan.save(tmp / "ditfastattn-v1.json")
        out["DiTFastAttn v1 plan t0.1"] = (lambda: (odd.enable(pipe, "ditfastattn", plan=str(path)), None)[1],
                                           lambda: odd.disable(pipe))

    def combined() -> Any:
        runner = odd.enable(pipe, "vgdfr", keep_ratio=0.75, **vg)
        odd.enable(pipe, "ditfastattn", strategy="ast")
        return runner
    out["VGDFR keep 0.75 + DiTFastAttn AST"] = (combined, lambda: odd.disable(pipe))
    if only is None or any(n.startswith(("FirstBlockCache", "PyramidAttention", "TaylorSeer", "MagCache"))
                           for n in only):
        mag = magcache_ratios(pipe, dict(calib_call(), output_type="latent"), steps)
        for name, cfg in peer_configs(pipe, steps, mag).items():
            out[name] = (lambda c=cfg: (pipe.transformer.enable_cache(c), None)[1],
                         lambda: pipe.transformer.disable_cache())
    return {k: v for k, v in out.items() if want(k)}


def run(quick: bool = False, device: str = "cpu", dtype: str = "float32", size: int | None = None,
        frames: int | None = None, steps: int | None = None, compress: int | None = None,
        transformer: dict[str, Any] | None = None, only: list[str] | None = None,
        seeds: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """One measurement; size/frames/steps/compress override the defaults ((128, 81, 10, 2), quick (32, 33, 4, 1)),
    ``transformer`` entries of the transformer config, ``only`` the configurations run (default: all), ``seeds``
    the prompt embeddings each configuration runs on."""
    torch.set_grad_enabled(False)
    load0 = os.getloadavg()[0]
    sizes = dict(zip(("size", "frames", "steps", "compress"), (32, 33, 4, 1) if quick else (128, 81, 10, 2)))
    sizes.update({k: v for k, v in dict(size=size, frames=frames, steps=steps, compress=compress).items()
                  if v is not None})
    size, frames, steps, compress = sizes["size"], sizes["frames"], sizes["steps"], sizes["compress"]
    if size % 16 or (frames - 1) % 4 or not 0 < compress < steps:
        raise ValueError(f"--size must be a multiple of 16 (got {size}), --frames 4k+1 (got {frames}), "
                         f"0 < --compress-step < --steps (got {compress}, {steps})")
    pipe = build(quick, device, getattr(torch, dtype), transformer)
    tmp = Path(tempfile.mkdtemp(prefix="vgdfr-bench-"))
    calib_call = lambda: inputs(100, size, frames, steps, device)  # noqa: E731
    configs = setups(pipe, steps, compress, calib_call, tmp, only)
    rows: dict[str, dict[str, list]] = {n: {k: [] for k in ("loop", "decode", "tokens", "flops", "psnr", "ssim")}
                                        for n in configs}
    errors: dict[str, str] = {}
    refs: dict[int, tuple[torch.Tensor, int, int]] = {}
    schedules: dict[str, list] = {}
    latent_frames = (frames - 1) // 4 + 1
    for seed in seeds:
        for name in ["none", *[n for n in configs if n != "none"], "none"]:
            if name in errors:
                continue
            enable, disable = configs[name]
            stamps: list[float] = []
            counter = SDPAFlops()
            try:
                runner = enable()
                target = runner if runner is not None else pipe
                cb = lambda p, i, t, kw: (stamps.append(time.perf_counter()), {})[1]  # noqa: E731
                t0 = time.perf_counter()
                with counter:
                    video = target(**inputs(seed, size, frames, steps, device, callback_on_step_end=cb)).frames
                t1 = time.perf_counter()
            except Exception as e:  # noqa: BLE001 - a peer that cannot run on Wan is reported, not fatal
                errors[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                continue
            finally:
                disable()
            r = rows[name]
            print(f"seed {seed} {name}: loop {stamps[-1] - t0:.2f} s, decode {t1 - stamps[-1]:.2f} s", flush=True)
            r["loop"].append(stamps[-1] - t0)
            r["decode"].append(t1 - stamps[-1])
            calls = getattr(runner, "denoiser_calls", None)
            r["tokens"].append(sum(n for _, n in calls) / (len(calls) * latent_frames) if calls else 1.0)
            if getattr(runner, "schedule", None) is not None:
                schedules.setdefault(name, []).append(runner.schedule.to_dict())
            if name == "none" and seed not in refs:
                refs[seed] = (video.float().cpu(), counter.flops, len(stamps))
                continue
            ref, ref_flops, _ = refs[seed]
            r["flops"].append(counter.flops / ref_flops)
            got = video.float().cpu()
            r["psnr"].append(psnr(got, ref))
            r["ssim"].append(ssim(got.flatten(0, 1), ref.flatten(0, 1)))
    base_loop = statistics.median(rows["none"]["loop"])
    base_decode = statistics.median(rows["none"]["decode"])
    table = []
    for name, r in rows.items():
        if name in errors or not r["loop"]:
            table.append({"method": name, "error": errors.get(name, "did not run")})
            continue
        table.append({
            "method": name,
            "tokens_fraction": round(statistics.mean(r["tokens"]), 4),
            "attention_flops_fraction": round(statistics.mean(r["flops"]), 4) if r["flops"] else 1.0,
            "loop_ratio": round(statistics.median(r["loop"]) / base_loop, 3),
            "decode_ratio": round(statistics.median(r["decode"]) / base_decode, 3),
            "loop_seconds": [round(s, 3) for s in r["loop"]],
            "decode_seconds": [round(s, 3) for s in r["decode"]],
            "psnr_db": round(statistics.mean(r["psnr"]), 2) if r["psnr"] else None,
            "ssim": round(statistics.mean(r["ssim"]), 4) if r["ssim"] else None,
            **({"keep_ratio": [s["keep_ratio"] for s in schedules[name]]} if name in schedules else {}),
        })
    tr = pipe.transformer
    return {
        **header("vgdfr", device),
        "pipeline": {"class": type(pipe).__name__, "transformer": {k: v for k, v in dict(tr.config).items()
                                                                   if not k.startswith("_")},
                     "dtype": dtype, "height": size, "width": size, "frames": frames, "latent_frames": latent_frames,
                     "vision_tokens": latent_frames * (size // 16) ** 2, "steps": steps, "vgdfr_compress_step": compress,
                     "eval_prompt_seeds": list(seeds), "calibration_prompt_seed": 100},
        "note": "random weights: PSNR/SSIM measure fidelity to the unaccelerated network's output, not video quality",
        "load_average_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "none_loop_seconds": [round(s, 3) for s in rows["none"]["loop"]],
        "rows": table,
        "schedules": schedules,
    }


def format_report(r: dict[str, Any]) -> str:
    p = r["pipeline"]
    v = r["versions"]
    lines = [f"{r['device']}, torch {v['torch']}, diffusers {v['diffusers']}: Wan {p['frames']} frames "
             f"{p['height']}x{p['width']} ({p['vision_tokens']} vision tokens), {p['steps']} steps; "
             f"none loop {r['none_loop_seconds']} s",
             f"{'method':36s} {'tokens':>7s} {'attn FLOPs':>10s} {'loop':>6s} {'decode':>7s} {'PSNR dB':>8s} {'SSIM':>7s}"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"{row['method']:36s} error: {row['error'][:80]}")
            continue
        ps = "inf" if row["psnr_db"] in (None, float("inf")) else f"{row['psnr_db']:.2f}"
        lines.append(f"{row['method']:36s} {row['tokens_fraction']:7.3f} {row['attention_flops_fraction']:10.3f} "
                     f"{row['loop_ratio']:6.3f} {row['decode_ratio']:7.3f} {ps:>8s} "
                     f"{row['ssim'] if row['ssim'] is not None else '-':>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a measurement)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--size", type=int, default=None, help="height = width in pixels (default 128; quick 32)")
    ap.add_argument("--frames", type=int, default=None, help="pixel frames, 4k+1 (default 81; quick 33)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; quick 4)")
    ap.add_argument("--compress-step", type=int, default=None, help="VGDFR's K (default 2; quick 1)")
    args = ap.parse_args(argv)
    r = run(args.quick, args.device, args.dtype, args.size, args.frames, args.steps, args.compress_step)
    if args.json:
        write_json(args.json, r, indent=1)
    print(format_report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

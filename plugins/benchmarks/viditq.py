"""ViDiT-Q against float and Diffusers' torchao int8 quantizer, measured in one run on one pipeline.

    python -m overdrive.benchmarks.viditq [--json OUT.json] [--quick] [--size PX] [--double N --single N] [--repeat R]

Pipeline: Flux (FluxPipeline, FlowMatch Euler, 4 steps, by default 64x64 px = 1024 image + 32 text
tokens: the tiny VAE does not downsample; ``--size``, ``--double``, ``--single`` change the size and the
block counts) with a random-weight transformer (``BENCH_FLUX``), no text encoders (prompt embeddings are inputs),
saved to a temporary directory and loaded back by each configuration with ``from_pretrained``.
ViDiT-Q calibrates (default options unless the configuration says otherwise; the default W4A8 is
``viditq-w4a8-2ranges``) on two prompt embeddings (seeds 100, 101; ``overdrive.diffusers.calibrate`` +
``write_pipeline``, as the CLI does); evaluation uses two others (seeds 1, 2).

Every configuration runs in its own process (``bench_probe``): denoiser parameter bytes (tensor
subclasses counted by their inner tensors), RSS after loading and peak RSS, wall clock per pipeline
call (median of ``--repeat`` x 2 calls after one warm-up), and the final latents, compared with the
float32 latents of the same input: relative L2 error and PSNR (peak = the float latents' range).

Configurations: float32, bfloat16, torchao int8 dynamic-activation/int8-weight (W8A8) and int8
weight-only (both bf16, as diffusers requires for torchao int8), ViDiT-Q W8A8 and W4A8 in bf16
(memory and time next to torchao) and, in float32 for the fidelity comparison, ViDiT-Q W8A8/W4A8 with
one timestep range (not timestep-aware: one weight set, balancing from all steps) and with two
ranges (per-range balancing alpha and divisors), each with the alpha search, plus W4A8 with mixed
precision (30% of the weights allowed at 8 bits per range).

On CPU the int8 layers run overdrive's torch reference of the kernel (float64 GEMM on the integer
codes: exact, not fast): the CPU columns show memory and fidelity; speed needs the Triton kernel on
a GPU (``python -m overdrive.benchmarks.viditq_gpu``). Random weights: fidelity here is closeness to this
network's float output, not image quality of a trained model.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import overdrive.diffusers as odd
from overdrive.benchmarks import dist_version, header, write_json
from overdrive.testing.probe import child_env, run_probe

BENCH_FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=64,
                  num_attention_heads=6, joint_attention_dim=128, pooled_projection_dim=128,
                  axes_dims_rope=[16, 24, 24])
QUICK_FLUX = dict(BENCH_FLUX, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
STEPS = 4
TEXT_TOKENS = 32

# (name, dtype, calibration options or None)
VIDITQ = {
    "viditq-w8a8": dict(scheme="w8a8"),
    "viditq-w8a8-1range": dict(scheme="w8a8", ranges=1, alpha="search"),
    "viditq-w8a8-2ranges": dict(scheme="w8a8", ranges=2, alpha="search"),
    "viditq-w4a8-1range": dict(scheme="w4a8", ranges=1, alpha="search"),
    "viditq-w4a8-2ranges": dict(scheme="w4a8", ranges=2, alpha="search"),
    # the alphas the search chose for viditq-w4a8-2ranges (the search is not repeated)
    "viditq-w4a8-2ranges-mp30": dict(scheme="w4a8", ranges=2, alpha="viditq-w4a8-2ranges", mixed_precision=0.3),
}
CONFIGS = [("float32", "float32", None), ("bfloat16", "bfloat16", None),
           ("torchao-int8-dynamic", "bfloat16", None), ("torchao-int8-weight-only", "bfloat16", None),
           ("viditq-w8a8", "bfloat16", "viditq-w8a8"), ("viditq-w4a8", "bfloat16", "viditq-w4a8-2ranges"),
           ("viditq-w8a8-1range", "float32", "viditq-w8a8-1range"),
           ("viditq-w8a8-2ranges", "float32", "viditq-w8a8-2ranges"),
           ("viditq-w4a8-1range", "float32", "viditq-w4a8-1range"),
           ("viditq-w4a8-2ranges", "float32", "viditq-w4a8-2ranges"),
           ("viditq-w4a8-2ranges-mp30", "float32", "viditq-w4a8-2ranges-mp30")]


def _embeds(seeds: list[int], cfg: dict) -> dict[str, torch.Tensor]:
    out = {}
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        out[f"{i}.prompt_embeds"] = torch.randn(1, TEXT_TOKENS, cfg["joint_attention_dim"], generator=g)
        out[f"{i}.pooled_prompt_embeds"] = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    return out


def build_pipeline(cfg: dict) -> Any:
    import diffusers

    from overdrive.testing.diffusion import FAMILIES

    fam = FAMILIES["flux"]
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(**cfg).eval()
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(**fam.vae[1]).eval()
    pipe = diffusers.FluxPipeline(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                  **{c: None for c in fam.none_components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((x.double() - ref.double()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def run(quick: bool = False, repeat: int = 2, threads: int | None = None, size: int | None = None,
        double: int | None = None, single: int | None = None) -> dict[str, Any]:
    """``size`` (px, default 64; 32 with ``quick``), ``double`` / ``single``: block counts replacing the model's."""
    from safetensors.torch import load_file, save_file

    cfg = dict(QUICK_FLUX if quick else BENCH_FLUX)
    if double is not None:
        cfg["num_layers"] = double
    if single is not None:
        cfg["num_single_layers"] = single
    size = size or (32 if quick else 64)
    call = dict(height=size, width=size, num_inference_steps=STEPS, guidance_scale=3.5)
    tmp = Path(tempfile.mkdtemp(prefix="viditq-bench-"))
    pipe = build_pipeline(cfg)
    pipe.save_pretrained(tmp / "pipe")
    denoiser_params = sum(p.numel() for p in pipe.transformer.parameters())
    calib = _embeds([100, 101], cfg)
    calib_kw = {"prompt_embeds": torch.cat([calib["0.prompt_embeds"], calib["1.prompt_embeds"]]),
                "pooled_prompt_embeds": torch.cat([calib["0.pooled_prompt_embeds"], calib["1.pooled_prompt_embeds"]]),
                **call, "output_type": "latent", "generator": torch.Generator().manual_seed(100)}
    calibrations = {}
    for name, options in VIDITQ.items():
        if options.get("alpha") in calibrations:
            options = dict(options, alpha=calibrations[options["alpha"]]["alpha"])
        t = time.perf_counter()
        ckpt = odd.calibrate(pipe, "viditq", options, **calib_kw)
        odd.write_pipeline(tmp / "pipe", tmp / name, ckpt)
        plan = ckpt.plan
        calibrations[name] = {"options": options, "seconds": round(time.perf_counter() - t, 1),
                              "summary": ckpt.summary(), "alpha": plan.alpha, "ranges": plan.ranges,
                              "quantized_weight_bytes": plan.weight_bytes(),
                              "teacher_forced_relative_error_per_range":
                                  plan.meta["teacher_forced_relative_error_per_range"],
                              **({"w8_fraction": [c["w8_fraction"] for c in plan.meta["mixed_precision_choice"]]}
                                 if "mixed_precision_choice" in plan.meta else {})}
        print(f"calibrated {name}: {ckpt.summary()}", flush=True)
    seeds = [1, 2]
    save_file(_embeds(seeds, cfg), str(tmp / "eval.safetensors"))
    results = []
    # torchao is a benchmark-only requirement (requirements/bench.txt): installed, transformers imports it
    # in every process (~2.4 s here), so the test environment goes without it
    have_torchao = importlib.util.find_spec("torchao") is not None
    skipped = [] if have_torchao else [name for name, _, _ in CONFIGS if name.startswith("torchao")]
    if skipped:
        print(f"skipping {', '.join(skipped)}: torchao is not installed (pip install -r requirements/bench.txt)",
              flush=True)
    for name, dtype, ckpt_name in CONFIGS:
        if name in skipped:
            continue
        job = {"pipeline": str(tmp / (ckpt_name or "pipe")), "config": name, "dtype": dtype, "seeds": seeds,
               "inputs": str(tmp / "eval.safetensors"), "call": call, "repeat": repeat,
               "latents": str(tmp / f"{name}.latents.safetensors"), **({"threads": threads} if threads else {})}
        r = run_probe("overdrive.benchmarks.viditq_probe", job, env=child_env({"OVERDRIVE_PROGRESS": "0"}), timeout=3600).result
        r["median_call_s"] = round(statistics.median(r["call_s"]), 4)
        results.append(r)
        print(f"{name}: {r['denoiser_bytes'] / 2**20:.2f} MiB denoiser, peak RSS {r['peak_rss_mib']} MiB, "
              f"{r['median_call_s']} s/call", flush=True)
    ref = load_file(str(tmp / "float32.latents.safetensors"))
    base = next(r for r in results if r["config"] == "float32")
    for r in results:
        lat = load_file(str(tmp / f"{r['config']}.latents.safetensors"))
        rel = [float((lat[k].double() - ref[k].double()).norm() / ref[k].double().norm()) for k in sorted(ref)]
        r["latent_rel_l2"] = [round(x, 6) for x in rel]
        r["latent_psnr_db"] = [round(psnr(lat[k], ref[k]), 2) for k in sorted(ref)]
        r["denoiser_bytes_vs_float32"] = round(r["denoiser_bytes"] / base["denoiser_bytes"], 4)
        r["time_vs_float32"] = round(r["median_call_s"] / base["median_call_s"], 3)
    report = header("viditq", "cpu", skipped=skipped)
    report["versions"]["torchao"] = dist_version(["torchao"])
    return {
        **report,
        "pipeline": {"transformer": "FluxTransformer2DModel", "config": cfg, "denoiser_params": denoiser_params,
                     "steps": STEPS, "size": size, "repeat": repeat, "text_tokens": TEXT_TOKENS, "weights": "random (seed 0)",
                     "calibration_seeds": [100, 101], "eval_seeds": seeds},
        "kernel_backend_on_this_device": "torch reference of act8_linear (float64 GEMM on integer codes)",
        "calibrations": calibrations, "results": results,
    }


def table(res: dict[str, Any]) -> str:
    rows = ["| configuration | dtype | denoiser MiB | vs fp32 | peak RSS MiB | s/call | vs fp32 | latent rel. L2 | latent PSNR dB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        rows.append(f"| {r['config']} | {r['dtype']} | {r['denoiser_bytes'] / 2**20:.2f} | {r['denoiser_bytes_vs_float32']:.3f} "
                    f"| {r['peak_rss_mib']:.0f} | {r['median_call_s']:.2f} | {r['time_vs_float32']:.2f} "
                    f"| {statistics.mean(r['latent_rel_l2']):.2e} | {statistics.mean(r['latent_psnr_db']):.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="a tiny model (seconds), for testing the script")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image side in px (default 64; 32 with --quick)")
    p.add_argument("--double", type=int, default=None, help="double-stream blocks (default 2; 1 with --quick)")
    p.add_argument("--single", type=int, default=None, help="single-stream blocks (default 4; 1 with --quick)")
    args = p.parse_args(argv)
    res = run(args.quick, args.repeat, args.threads, args.size, args.double, args.single)
    print(table(res))
    if args.json:
        write_json(args.json, res, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LLM calibration at scale: W4 g128 AWQ of a random-weight model of Llama-3-8B's shape, block by block on a
device (a benchmark, not a test).

    python -m overdrive.benchmarks.calibration [--device cuda] [--json OUT] [--quick]

The model is built with random weights (bf16) on the CPU; the LLM calibration layer onloads one decoder
block at a time to ``--device`` (activations on the device), runs MBQ's AWQ scale search (``--samples`` x
``--seq-len`` random tokens, the search loss on at most ``--search-tokens`` of them) and releases the
block. Reported: wall time of the calibration, peak device memory (CUDA: ``max_memory_allocated``;
else the bytes of block parameters resident at once) and its fraction of the bf16 model's size.
Goal on an H100: <= 10 minutes, peak <= 25% of the bf16 model. ``--quick``: tiny shapes on any device
(the fast test tier runs it on the CPU).

``run(device, quick, out_dir)`` is the entry point of the one GPU script (``overdrive.benchmarks.gpu``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header

#: Llama-3-8B's shape (random weights)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rope_theta=10000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False)


def random_llama(shape: dict[str, Any], dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """A LlamaForCausalLM of ``shape`` on the CPU with random weights (normal(0, 0.02) linears, unit norms),
    built on the meta device first so no float32 copy is ever made."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
        for name, b in model.named_buffers():
            if name.endswith("inv_freq"):
                d = b.numel() * 2
                b.copy_(1.0 / (shape["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d)))
    return model.eval()


def run(device: str, quick: bool, out_dir: Path | None = None, samples: int | None = None,
        seq_len: int | None = None, search_tokens: int | None = None, offload_activations: bool = False
        ) -> dict[str, Any]:
    """Build the model, calibrate it, return the report (also written to ``out_dir/calibration.json``)."""
    from overdrive.contracts.llm_calibration import check_device, load_for_calibration
    from overdrive.mbq.calibrate import SEARCH_TOKENS, calibrate
    from overdrive.mbq.config import MBQConfig
    from overdrive.mbq.data import CalibSample

    device = check_device(device)
    shape = QUICK if quick else LLAMA3_8B
    samples = samples or (4 if quick else 128)
    seq_len = seq_len or (64 if quick else 512)
    search_tokens = SEARCH_TOKENS if search_tokens is None else search_tokens
    group = 32 if quick else 128
    t0 = time.perf_counter()
    model = random_llama(shape)
    build_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (samples, seq_len), generator=g)
    batch = 8
    data = [CalibSample({"input_ids": b, "attention_mask": torch.ones_like(b)}, torch.zeros(b.shape, dtype=torch.bool),
                        torch.ones(b.shape, dtype=torch.bool)) for b in ids.split(batch)]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    calib = load_for_calibration(model, device=device, compute_dtype=torch.float32,
                                 offload_activations=offload_activations)
    try:
        results = calibrate(calib, data, MBQConfig(bits=4, group_size=group, baseline="awq"),
                            search_tokens=search_tokens)
    finally:
        calib.close()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    report = {
        **header("calibration", device),
        "model": "random-weight LlamaForCausalLM, " + ("tiny shape (--quick)" if quick else "Llama-3-8B shape"),
        "shape": shape, "model_bytes_bf16": model_bytes, "scheme": f"W4 g{group} AWQ",
        "calibration": {"samples": samples, "seq_len": seq_len, "tokens": samples * seq_len,
                        "search_tokens": search_tokens, "activations": "cpu" if offload_activations else "device"},
        "build_seconds": build_s, "calibration_seconds": seconds,
        "peak_device_bytes": peak, "peak_fraction_of_bf16_model": (peak / model_bytes) if peak is not None else None,
        "peak_block_param_bytes": calib.onloader.peak, "blocks_onloaded_at_once": calib.onloader.max_blocks,
        "groups": len(results), "all_losses_finite": all(r.loss == r.loss for r in results),
        "goal": "H100: <= 600 s, peak <= 25% of the bf16 model",
    }
    if out_dir is not None:
        from overdrive.benchmarks import write_json

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "calibration.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.calibration", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the fast test tier runs this on the CPU)")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128; quick 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; quick 64)")
    ap.add_argument("--search-tokens", type=int, default=None, help="tokens the search loss uses (default: MBQ's)")
    ap.add_argument("--offload-activations", action="store_true", help="keep activations on the CPU")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    r = run(args.device, args.quick, None, args.samples, args.seq_len, args.search_tokens, args.offload_activations)
    peak = r["peak_device_bytes"]
    print(f"{r['device']}  {r['date']}  {r['model']}: {r['scheme']}, {r['calibration']['tokens']} tokens: "
          f"{r['calibration_seconds']:.1f} s; peak device memory "
          + (f"{peak / 2**30:.2f} GiB ({100 * r['peak_fraction_of_bf16_model']:.1f}% of the bf16 model)"
             if peak is not None else f"n/a on {r['device']} (one block resident: {r['blocks_onloaded_at_once']})"))
    if args.json:
        from overdrive.benchmarks import write_json

        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One configuration of the ViDiT-Q benchmark, in a fresh process (peak RSS is per process).

    python -m overdrive.benchmarks.viditq_probe '{"pipeline": DIR, "config": NAME, "dtype": "bfloat16", ...}'

Loads the pipeline as the configuration says (float, Diffusers' torchao quantizer, or a ViDiT-Q
pipeline directory through the registered quantizer), reports the denoiser's parameter bytes (the
storage of tensor subclasses counted through their inner tensors), RSS after loading and at peak,
the wall clock of each pipeline call, and writes the final latents of each evaluation input to
``latents`` (safetensors) for the fidelity columns.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.testing.probe import emit


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores: a wrapper subclass (torchao's Int8Tensor, ...) by its inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(model: torch.nn.Module) -> int:
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc/self/status. Not ``ru_maxrss``:
    Linux carries it over fork + exec, so a probe would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load(job: dict[str, Any]) -> Any:
    import diffusers
    from diffusers import DiffusionPipeline

    import overdrive.diffusers  # noqa: F401  (registers the ViDiT-Q quantizer)

    dtype = getattr(torch, job["dtype"])
    none = {k: None for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    kind = job["config"]
    if kind.startswith("torchao"):
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        qc = TorchAoConfig(Int8DynamicActivationInt8WeightConfig() if "dynamic" in kind else Int8WeightOnlyConfig())
        cls = getattr(diffusers, json.loads((Path(job["pipeline"]) / "transformer" / "config.json").read_text())["_class_name"])
        tr = cls.from_pretrained(str(Path(job["pipeline"]) / "transformer"), quantization_config=qc, torch_dtype=dtype)
        pipe = DiffusionPipeline.from_pretrained(job["pipeline"], transformer=tr, torch_dtype=dtype, **none)
    else:
        pipe = DiffusionPipeline.from_pretrained(job["pipeline"], torch_dtype=dtype, **none)
        if kind.startswith("viditq"):
            overdrive.diffusers.enable(pipe, "viditq")  # bind the pipeline (step count checked up front)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(job: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    t0 = time.perf_counter()
    pipe = load(job)
    load_s = time.perf_counter() - t0
    rss_loaded = _status_mib("VmRSS")
    dtype = getattr(torch, job["dtype"])
    inputs = load_file(job["inputs"])
    seeds = job["seeds"]

    def call(i: int) -> torch.Tensor:
        kw = {k[len(f"{i}."):]: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()
              if k.startswith(f"{i}.")}
        with torch.no_grad():
            return pipe(**kw, **job["call"], generator=torch.Generator().manual_seed(seeds[i]),
                        output_type="latent")[0]

    call(0)  # warm-up
    times, latents = [], {}
    for rep in range(job["repeat"]):
        for i in range(len(seeds)):
            t = time.perf_counter()
            out = call(i)
            times.append(time.perf_counter() - t)
            latents[str(i)] = out.float().contiguous()
    save_file(latents, job["latents"])
    return {
        "config": job["config"], "dtype": job["dtype"],
        "denoiser_bytes": module_bytes(pipe.transformer),
        "rss_after_load_mib": round(rss_loaded, 1),
        "peak_rss_mib": round(_status_mib("VmHWM"), 1),
        "load_s": round(load_s, 3), "call_s": [round(x, 4) for x in times],
        "quantized_layers": sum(1 for m in pipe.transformer.modules() if type(m).__name__ == "ViDiTQLinear"),
    }


if __name__ == "__main__":
    emit(main(json.loads(sys.argv[1])))

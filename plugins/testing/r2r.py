"""A tiny small/large model pair for token routing (R2R): same tokenizer, mostly agreeing greedy choices.

The small model is :func:`~overdrive.testing.llm.tiny_llama` (2 layers). The large model holds the
small model's layers, embedding, final norm and LM head, with ``extra_layers`` seeded random layers
appended whose output projections are scaled by ``extra_scale``: it perturbs the small model's
residual stream, so the two agree on most greedy tokens and disagree on some (0.1: about one greedy
token in five differs on :data:`PROMPTS`), the situation R2R is built for (two independently random
models would disagree everywhere). Loadable by transformers and vLLM; float32.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .cache import cached_build
from .llm import tiny_llama
from .vllm_server import VllmServer

BUILDER_VERSION = 3  # 2: router thresholds in the middle of a probability gap; 3: seeded dropout

#: prompts the tests, calibration smoke runs and the benchmark use
PROMPTS = ["the quick brown fox", "hello world, this is", "one two three four", "describe the video.",
           "the model answers questions", "a cat sits on a red mat", "quantization of weights and",
           "overdrive makes efficient inference"]


def tiny_r2r_pair(extra_layers: int = 2, extra_scale: float = 0.1, seed: int = 1) -> tuple[Path, Path]:
    """(small, large) checkpoint folders sharing one tokenizer (see the module docstring)."""
    small = tiny_llama()
    params = {"builder": "tiny_r2r_large", "version": BUILDER_VERSION, "small": small.name,
              "extra_layers": extra_layers, "extra_scale": extra_scale, "seed": seed}
    large = cached_build("tiny-r2r-large", params, lambda out: _build_large(out, small, extra_layers, extra_scale, seed))
    return small, large


def _build_large(out: Path, small: Path, extra_layers: int, extra_scale: float, seed: int) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = json.loads((small / "config.json").read_text())
    n_small = int(conf["num_hidden_layers"])
    conf["num_hidden_layers"] = n_small + extra_layers
    config = LlamaConfig.from_dict({k: v for k, v in conf.items() if k not in ("architectures", "transformers_version")})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    state = load_file(str(small / "model.safetensors"))
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(".layers." in k and int(k.split(".")[2]) >= n_small for k in missing), missing
        for layer in model.model.layers[n_small:]:
            layer.self_attn.o_proj.weight.mul_(extra_scale)
            layer.mlp.down_proj.weight.mul_(extra_scale)
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    for f in small.iterdir():  # the very same tokenizer files
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy2(f, out / f.name)


#: router trained by :func:`tiny_r2r_router` (small, quick: the tiny pair has hidden size 128)
ROUTER_OPTIONS = {"topk": 100, "width": 64, "blocks": 2, "epochs": 60, "batch_size": 64, "lr": 1e-3,
                  "max_new_tokens": 32, "continuation_tokens": 4}


def tiny_r2r_router() -> Path:
    """Folder of an R2R router trained on the tiny pair with ``overdrive calibrate --method r2r``'s
    pipeline (built-in prompts, agreement judge), cached like the checkpoints."""
    small, large = tiny_r2r_pair()
    params = {"builder": "tiny_r2r_router", "version": BUILDER_VERSION, "small": small.name, "large": large.name,
              **ROUTER_OPTIONS}
    return cached_build("tiny-r2r-router", params, lambda out: _build_router(out / "router", small, large)) / "router"


def _build_router(out: Path, small: Path, large: Path) -> None:
    import argparse

    from overdrive.r2r import calibrate, cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    o = ROUTER_OPTIONS
    args = p.parse_args(["--small", str(small), "--large", str(large), "--output", str(out), "--topk", str(o["topk"]),
                         "--width", str(o["width"]), "--blocks", str(o["blocks"]), "--epochs", str(o["epochs"]),
                         "--batch-size", str(o["batch_size"]), "--lr", str(o["lr"]),
                         "--max-new-tokens", str(o["max_new_tokens"]),
                         "--continuation-tokens", str(o["continuation_tokens"])])
    calibrate.calibrate(args)


class RoutingServer(VllmServer):
    """``overdrive serve-METHOD`` on a free port as a subprocess (own session), used like :class:`VllmServer`:
    ``with RoutingServer(small, large, router) as srv: srv.client().completions.create(model="r2r", ...)``."""

    def __init__(self, small: Path, large: Path, router: Path, args: Sequence[str] = (), method: str = "r2r",
                 **kw: Any) -> None:
        super().__init__(small, (), **kw)
        self.model = method  # the served model name
        self.command = [sys.executable, "-m", "overdrive.cli", f"serve-{method}", "--small", str(small), "--large",
                        str(large), "--router", str(router), "--host", "127.0.0.1", "--port", str(self.port),
                        "--dtype", "float32", *args]

"""Hessian-aware PCDVQ calibration: per-linear Hessians from the LLM calibration layer, GPTQ-style VQ.

Block by block (:func:`overdrive.contracts.llm_calibration.load_for_calibration`: one decoder block on
the device at a time), the inputs of the block's linear layers are recorded on the calibration text
(:meth:`CalibrationBlock.record` with an ``on_input`` accumulator: ``H = 2 X^T X / tokens``, float64; q/k/v
share their input's Hessian, as do gate/up), each quantized linear is quantized against its Hessian
(:func:`overdrive.pcdvq.gptvq.quantize_weight_hessian`) and its dequantized weight is written back into
the block, so later blocks calibrate on the quantized model's activations (``propagate="calibrated"``,
as GPTQ does). The block's linears are recorded once, on the block's float weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import load_for_calibration
from overdrive.mbq.gptq import Hessian

from .config import PCDVQConfig
from .gptvq import quantize_weight_hessian
from .quantizer import dequantize_weight

#: role -> the role whose input it shares (its Hessian is recorded once)
SHARED_INPUT = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}


@dataclasses.dataclass
class HessianOptions:
    """``--hessian`` calibration: text file, number of sequences and their length, model dtype, where
    activations live, GPTQ dampening."""

    calib: Path
    samples: int = 32
    seq_len: int = 512
    dtype: str | None = None
    offload_activations: bool = False
    percdamp: float = 0.01


def calibration_batches(tokenizer: Any, text: str, samples: int, seq_len: int, batch: int = 4
                        ) -> list[dict[str, torch.Tensor]]:
    """``samples`` consecutive chunks of ``seq_len`` tokens of ``text``, ``batch`` rows per batch."""
    if samples <= 0 or seq_len <= 0:
        raise ConfigError(f"--calib-samples and --calib-len must be positive, got {samples} and {seq_len}")
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        raise ConfigError(f"--calib: {len(ids)} tokens, fewer than one --calib-len chunk of {seq_len}")
    chunks = torch.tensor(ids[:n * seq_len], dtype=torch.long).reshape(n, seq_len)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in chunks.split(batch)]


def _checkpoint_name(index: int, rel: str, names: dict[str, tuple[int, ...]]) -> str | None:
    hits = [n for n in names if n.endswith(f".{index}.{rel}.weight")]
    if len(hits) > 1:
        raise ConfigError(f"PCDVQ --hessian: decoder block {index} module {rel!r} matches several checkpoint "
                          f"tensors: {hits}")
    return hits[0] if hits else None


@torch.no_grad()
def hessian_codes(model: Path, shapes: dict[str, tuple[int, ...]], cfg: PCDVQConfig, codebook: torch.Tensor,
                  opts: HessianOptions, device: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint tensor name -> stored tensors, for every quantized linear inside a decoder block."""
    calib = Path(opts.calib)
    if not calib.is_file():
        raise ConfigError(f"--calib {calib}: not a file (a UTF-8 text file of calibration text)")
    text = calib.read_text(encoding="utf-8")
    out: dict[str, dict[str, torch.Tensor]] = {}
    run = load_for_calibration(model, device=device, dtype=opts.dtype, offload_activations=opts.offload_activations)
    try:
        batches = calibration_batches(run.tokenizer, text, opts.samples, opts.seq_len)
        for block in run.blocks(batches, propagate="calibrated", desc="pcdvq hessian"):
            rel = {id(m): name for name, m in block.module.named_modules()}
            targets = {}
            for role, mod in block.roles.items():
                if role not in SHARED_INPUT:
                    continue
                name = _checkpoint_name(block.index, rel[id(mod)], shapes)
                if name is not None:
                    targets[role] = (name, mod)
            if not targets:
                continue
            recorded = sorted({SHARED_INPUT[r] for r in targets})
            hs = {r: Hessian(block.roles[r].weight.shape[1], torch.float64, block.device) for r in recorded}
            block.record(recorded, on_input=lambda r, x, _j: hs[r].add(x), keep=lambda _j: False)
            for role, (name, mod) in targets.items():
                t = quantize_weight_hessian(name, mod.weight.detach().cpu(), hs[SHARED_INPUT[role]].get().cpu(), cfg,
                                            codebook, block.device, opts.percdamp)
                out[name] = t
                mod.weight.copy_(dequantize_weight(t, cfg, codebook, torch.float32).to(mod.weight))
    finally:
        run.close()
    return out

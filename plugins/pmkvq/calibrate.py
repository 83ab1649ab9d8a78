"""``overdrive calibrate --method pmkvq``: per-layer KV bit widths under a memory budget, and key scales.

Pipeline (``calibrate(run, batches, opts)``) on a language model loaded for calibration (the LLM calibration
layer, :func:`overdrive.contracts.llm_calibration.load_for_calibration`: one decoder block on the device at a
time):

1. **Positional interpolation.** Calibration sequences of ``seq_len`` tokens run with position ids
   ``0, r, 2r, ...`` where ``r = max_len // seq_len``, so rotary embeddings see the angles of a
   ``max_len``-token context without a ``max_len``-token forward pass.
2. **Key maxima.** Per layer, KV head and channel, max |K| over the calibration tokens (K after
   RoPE, as cached); the two channels of a rotary pair (c, c + D/2) share the larger one.
3. **Reparameterisation search.** Per layer, ``s = maxK ** alpha`` for alpha in 1, 0.95, ..., 0.05
   (and alpha = 0, no scaling, so the result is never worse than none on the calibration data): the
   alpha whose attention output with 4-bit K / s (dequantized and multiplied back through q * s) and
   4-bit V is closest (MSE) to the float attention output wins. ``s`` is normalised to geometric mean 1
   per head, folded into ``q_proj`` / ``k_proj`` (:mod:`.reparam`) and recorded in the plan.
4. **Sensitivity.** One backward pass of the LM loss per batch, on the reparameterised model, block by
   block (the layer's block-wise backward). The K (after RoPE) and V of every layer and their gradients
   are recorded by the *same* attention call of the block being recomputed, so activation and gradient are paired layer by layer by construction
   (PM-KVQ's reference zips forward activations with backward-hook gradients, which arrive in the
   opposite layer order). ``S[l][b] = mean |(Q_b(K) - K) * dL/dK| + mean |(Q_b(V) - V) * dL/dV|``.
5. **Allocation.** An integer program (``scipy.optimize.milp``): one width per layer minimising the
   total sensitivity, with the sum of the layers' peak memory at ``max_len`` tokens (sink and window
   at full precision, :func:`.config.layer_peak_bytes`) within the budget. The plan records each
   layer's width and its peak memory as its budget.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import fold_qk_scale
from overdrive.contracts.llm_calibration import AttentionCall, LLMCalibration

from .config import CalibOptions, PMKVQPlan, head_group, layer_peak_bytes, make_plan
from .search import (ALPHAS, allocate, layer_sensitivity, pair_max, parse_budget, qdq, scales_for,
                     search_alpha)

__all__ = ["ALPHAS", "BUILTIN_TEXT", "CalibOptions", "LayerStats", "allocate", "calibrate", "collect_stats",
           "layer_sensitivity", "pair_max", "parse_budget", "position_ids_for", "qdq", "scales_for", "search_alpha",
           "sensitivity", "token_batches"]

#: a short English text so the command works out of the box; real calibration should pass --data
BUILTIN_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the sea. "
    "In spring the water is high and fast; by late summer children can wade across near the ford. "
    "A long proof begins with definitions, states a lemma, and then checks each case in turn, "
    "carrying the bound from one step to the next until the inequality closes. "
    "To solve the equation, first isolate the square root, square both sides, and then verify "
    "every candidate, because squaring can introduce solutions that do not satisfy the original. "
    "The committee met on Tuesday to review the budget, and after a long discussion it agreed to "
    "fund the library repairs, the new bus route, and a study of the harbour walls. "
)


def position_ids_for(seq_len: int, max_len: int, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stretched position ids (positional interpolation): stride ``max(1, max_len // seq_len)``."""
    stride = max(1, max_len // seq_len)
    return (torch.arange(seq_len, device=device) * stride).expand(batch, seq_len)


@dataclasses.dataclass
class LayerStats:
    maxk: torch.Tensor  # (Hk, D), pair-shared
    alpha: float = 0.0
    search_err: float = float("nan")
    base_err: float = float("nan")


def _batches(batches: Sequence[torch.Tensor], opts: CalibOptions) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids, "position_ids": position_ids_for(ids.shape[1], opts.max_len, ids.shape[0])}
            for ids in batches]


@torch.no_grad()
def collect_stats(run: LLMCalibration, batches: Sequence[torch.Tensor], opts: CalibOptions, group: int,
                  fold: bool = False) -> list[LayerStats]:
    """Steps 1-3, block by block: key maxima under positional interpolation and the alpha search (no grad);
    ``fold``: the chosen scales are folded into each block (its outputs propagate from before the fold)."""
    stats = []
    for block in run.blocks(_batches(batches, opts), propagate="original", desc="pmkvq: key statistics"):
        seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def record(call: AttentionCall) -> None:
            seen.append((call.query, call.key, call.value))

        block.run(attention=record)
        maxk = torch.zeros(run.geometry.num_kv_heads, run.geometry.head_size)
        for _, k, _ in seen:
            maxk = torch.maximum(maxk, k.detach().abs().float().amax(dim=(0, 2)).cpu())
        st = LayerStats(pair_max(maxk))
        if opts.reparam:
            q, k, v = (torch.cat([s[n] for s in seen]).detach() for n in range(3))
            st.alpha, st.search_err, st.base_err = search_alpha(q, k, v, st.maxk, group, opts.search_bits)
            if fold and st.alpha > 0:
                fold_qk_scale(block.roles["q"], block.roles["k"], scales_for(st.maxk, st.alpha).double())
        stats.append(st)

    return stats


def sensitivity(run: LLMCalibration, batches: Sequence[torch.Tensor], opts: CalibOptions, group: int,
                bits: Sequence[int]) -> list[dict[int, float]]:
    """Step 4: S[layer][bits] from one LM-loss backward pass per batch, block by block (activations and
    gradients of a layer come from the same recorded attention call of the recomputed block)."""
    total = [{b: 0.0 for b in bits} for _ in range(run.geometry.num_layers)]
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(call: AttentionCall) -> None:
        call.key.retain_grad()
        call.value.retain_grad()
        held[call.layer] = (call.key, call.value)

    def visit(block, _j: int, _retained: dict) -> None:
        k, v = held.pop(block.index)
        terms = layer_sensitivity(k, k.grad, v, v.grad, group, bits)
        for b in bits:
            total[block.index][b] += terms[b] / len(batches)

    def loss(logits: torch.Tensor, j: int) -> torch.Tensor:
        ids = batches[j].to(logits.device)
        lg = logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))

    run.backward(_batches(batches, opts), loss, attention=record, visit=visit, desc="pmkvq: sensitivity")
    return total


def calibrate(run: LLMCalibration, batches: Sequence[torch.Tensor], opts: CalibOptions) -> PMKVQPlan:
    """Run the whole pipeline (module docstring) on ``run``'s model (modified: key scales folded in)."""
    ident = run.geometry.identity
    group = head_group(ident.head_size, opts.group_size)
    budget = parse_budget(opts.budget, ident, opts.max_len)
    fp_bytes = 2 if run.dtype in (torch.float16, torch.bfloat16) else 4
    bits = sorted(set(opts.candidate_bits), reverse=True)
    memory = [{b: layer_peak_bytes(b, opts.max_len, ident.num_kv_heads, ident.head_size, group, opts.sink,
                                   opts.window, fp_bytes) for b in bits} for _ in range(ident.num_layers)]
    # fail before any model work when even the smallest widths do not fit
    allocate([{b: 0.0 for b in bits} for _ in range(ident.num_layers)], memory, budget)

    stats = collect_stats(run, batches, opts, group, fold=True)
    key_scales = [scales_for(st.maxk, st.alpha).tolist() if opts.reparam and st.alpha > 0 else None for st in stats]
    sens = sensitivity(run, batches, opts, group, bits)
    chosen = allocate(sens, memory, budget)
    calib = {"samples": sum(int(b.shape[0]) for b in batches), "seq_len": int(batches[0].shape[1]),
             "position_stride": max(1, opts.max_len // int(batches[0].shape[1])), "data": opts.data,
             "search_bits": opts.search_bits,
             "search_mse": [[st.search_err, st.base_err] for st in stats] if opts.reparam else None}
    return make_plan(ident, chosen, opts.max_len, group_size=opts.group_size, sink=opts.sink, window=opts.window,
                     fp_bytes=fp_bytes, candidate_bits=bits,
                     layer_budgets=[memory[i][b] for i, b in enumerate(chosen)], key_scales=key_scales,
                     budget=str(opts.budget), sensitivity=sens, alphas=[st.alpha for st in stats],
                     calibration=calib)


# ------------------------------------------------------------------------------------------ data
def token_batches(tokenizer, seq_len: int, samples: int, batch_size: int, data: Path | None) -> list[torch.Tensor]:
    """``samples`` sequences of ``seq_len`` tokens from a text/jsonl file (or the built-in text), batched."""
    import json

    if data is None:
        text = BUILTIN_TEXT
    else:
        if not Path(data).is_file():
            raise ConfigError(f"--data {data}: file not found")
        raw = Path(data).read_text()
        if Path(data).suffix == ".jsonl":
            parts = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{data}:{n}: not valid JSON ({e})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise ConfigError(f"{data}:{n}: expected an object with a string 'text'")
                    parts.append(rec["text"])
            raw = "\n\n".join(parts)
        text = raw
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise ConfigError(f"--data {data}: no tokens")
    need = seq_len * samples
    reps = -(-need // ids.numel())
    stream = ids.repeat(reps)[:need] if data is None or ids.numel() < need else ids[:need]
    seqs = stream.reshape(samples, seq_len)
    return [seqs[i:i + batch_size] for i in range(0, samples, batch_size)]

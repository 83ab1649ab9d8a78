"""``overdrive calibrate --method moa``: per-KV-head elastic spans (alpha, beta) under a density budget.

Pipeline (``calibrate(run, opts)``) on a language model loaded for calibration (the LLM calibration layer,
:func:`overdrive.contracts.llm_calibration.load_for_calibration`: one decoder block on the device at a time):

1. **Data.** For every profile length ``N`` (``--lengths``, default ``M/4, M/2`` of ``M = --max-len``) and the
   validation length, ``--samples`` sequences: a context of ``N - R`` tokens from the text (``--data``) and a
   response of ``R = --response-tokens`` tokens that the dense model generates greedily (``--target dense``,
   MoA's recipe: the loss measures how far sparse attention moves the dense model's own answer), or simply
   ``N`` tokens of the text whose last ``R`` are the target (``--target text``: plain language modelling).
2. **Influence profile.** One forward + backward of the response-only LM loss per sample, block by block
   (the layer's block-wise backward: each block is recomputed with grad in reverse order), attention through
   SDPA with q, k, v and the attention output O recorded per layer and O's gradient kept. Then, per layer and in query chunks (never all layers' attention matrices at once), the
   attention ``A`` is recomputed and its gradient is ``g_ij = dO_i . v_j``; the first-order loss change of
   masking entry (i, j) (the row renormalised) is ``I_ij = -A_ij (g_ij - sum_k A_ik g_ik) / (1 - A_ij)``
   with ``sum_k A_ik g_ik = dO_i . O_i``. MoA sums ``I`` over 64x64 blocks and scores block-aligned
   candidates from those sums; here every candidate's exact per-query mask is scored from per-row prefix sums
   of ``I`` (the block sums are the special case of spans rounded to blocks). Under GQA the query heads of a
   KV group share a span, so their influences add: one span per KV head, no conversion to MHA.
3. **Candidates.** ``alpha`` in ``alpha_step * {-2, -1, 0, 1, 2, 4, 8}`` (``alpha_step = M / 16``) and
   ``beta`` in ``linspace(0, 1, --betas)``. Candidate c's loss for (layer, KV head) at length N: the sum of
   ``I`` over the entries its span drops, per sample averaged. Its density at N: the fraction of causal
   entries it reads (``HeadSpans.density``; the span rule is per query, see the KV-cache contract).
4. **Selection** (``scipy.optimize.milp``, no Gurobi): one candidate per (layer, KV head) minimising a
   weighted sum of the per-length losses (each normalised), with the model's mean density at every profile
   length and at ``M`` (extrapolation) at most ``--density``. One plan per weighting (each length alone, all
   lengths equally): MoA's Pareto set.
5. **Validation.** Each distinct plan's response loss at the unseen ``--validate-length`` (attention through
   the block-sparse span kernel with the plan's spans); the lowest wins. The plan records all of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from overdrive.config import ConfigError, read_jsonl
from overdrive.contracts.kv_cache import HeadSpans, ModelIdentity
from overdrive.contracts.llm_calibration import AttentionCall, LLMCalibration
from overdrive.kernels.span_attention import span_prefill_attention
from overdrive.progress import progress

from .config import TARGETS, CalibOptions, MoAPlan, make_plan, uniform_plan
from .search import (ALPHA_MULTIPLES, candidate_density, candidate_losses, candidates, influence_chunks, select,
                     uniform_references)

__all__ = ["ALPHA_MULTIPLES", "BUILTIN_TEXT", "TARGETS", "CalibOptions", "calibrate", "candidate_density",
           "candidate_losses", "candidates", "influence_chunks", "make_samples", "profile", "select",
           "uniform_references", "validation_loss"]

#: a short English text so the command works out of the box (repeated to length); pass --data for real use
BUILTIN_TEXT = (
    "The harbour wall was built in three seasons. In the first the masons laid the footing on the rock at low "
    "water; in the second they raised the face in dressed stone, course by course, and packed the core with "
    "rubble; in the third they capped it and set the iron rings for the boats. A proof by induction checks a "
    "base case and then shows that each case follows from the one before it, so the claim holds for every "
    "number. The committee asked for the accounts of the last ten years, compared the costs of repair with the "
    "costs of a new bridge, and recommended the repair, because the old piers were sound and the river had not "
    "moved its bed. "
)



# ------------------------------------------------------------------------------------ pipeline
def _context_ids(tokenizer, data: str) -> torch.Tensor:
    if data == "builtin":
        text = BUILTIN_TEXT
    else:
        path = Path(data)
        if not path.is_file():
            raise ConfigError(f"--data {data}: file not found")
        if path.suffix == ".jsonl":
            parts = []
            for n, rec in read_jsonl(path):
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ConfigError(f"{data}:{n}: expected an object with a string 'text'")
                parts.append(rec["text"])
            text = "\n\n".join(parts)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise ConfigError(f"--data {data}: no tokens")
    return ids


@torch.no_grad()
def make_samples(run: LLMCalibration, stream: torch.Tensor, length: int, opts: CalibOptions, offset: int
                 ) -> list[torch.Tensor]:
    """Batches (B, length) from ``stream`` (from ``offset``, wrapping): with ``target="dense"`` a context of
    ``length - R`` tokens followed by R tokens the dense model generates greedily (MoA's recipe); with
    ``target="text"`` ``length`` tokens of the text (its last R tokens are the target)."""
    r = opts.response_tokens
    ctx_len = length - r if opts.target == "dense" else length
    need = ctx_len * opts.samples
    reps = -(-(offset + need) // stream.numel())
    flat = stream.repeat(reps)[offset:offset + need].reshape(opts.samples, ctx_len)
    if opts.target == "text":
        return list(flat.split(opts.batch_size))
    return [run.generate(ctx, r)[:, :length] for ctx in flat.split(opts.batch_size)]


def _response_loss(logits: torch.Tensor, ids: torch.Tensor, r: int) -> torch.Tensor:
    """Mean cross entropy of the last ``r`` tokens of ``ids`` given ``logits`` at positions ``-r-1 .. -2``."""
    logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, -r:].reshape(-1).to(logits.device))


def profile(run: LLMCalibration, batches: Sequence[torch.Tensor], opts: CalibOptions, spans: HeadSpans,
            ident: ModelIdentity) -> torch.Tensor:
    """(L, Hk, C) candidate losses at one length, averaged over samples (block-wise backward)."""
    total = torch.zeros(ident.num_layers, ident.num_kv_heads, spans.num_heads, dtype=torch.float64)
    count = sum(int(b.shape[0]) for b in batches)
    held: dict[int, tuple] = {}
    r = opts.response_tokens

    def record(call: AttentionCall) -> torch.Tensor:
        out = call.default()
        out.retain_grad()
        held[call.layer] = (call.query.detach(), call.key.detach(), call.value.detach(), out, call.scale)
        return out

    def visit(block, _j: int, _retained: dict) -> None:
        q, k, v, out, scale = held.pop(block.index)
        if out.grad is None:
            raise RuntimeError("no gradient reached an attention output; is the model's attention on the "
                               "calibration path?")
        total[block.index] += candidate_losses(q, k, v, out, out.grad, scale, spans, opts.sink).cpu()

    run.backward([{"input_ids": b} for b in batches],
                 lambda logits, j: _response_loss(logits, batches[j], r).mul(batches[j].shape[0]),
                 attention=record, logits=slice(-r - 1, -1), visit=visit,
                 desc=f"moa: influence at {int(batches[0].shape[1])} tokens")
    return total / count


def _span_attention(plan: MoAPlan):
    spans = [plan.head_spans(i) for i in range(len(plan.layers))]

    def fn(call: AttentionCall) -> torch.Tensor:
        query, key, value = call.query, call.key, call.value
        b, hq, n, d = query.shape
        fmt = spans[call.layer]
        starts = fmt.starts(torch.arange(1, n + 1, device=query.device), plan.sink).repeat(b, 1)
        q, k, v = (t.transpose(1, 2).reshape(b * n, t.shape[1], d) for t in (query, key, value))
        out = span_prefill_attention(q, k, v, [i * n for i in range(b + 1)], starts, plan.sink, call.scale)
        return out.view(b, n, hq, d)

    return fn


@torch.no_grad()
def validation_loss(run: LLMCalibration, batches: Sequence[torch.Tensor], opts: CalibOptions,
                    plan: MoAPlan | None) -> float:
    """Mean response loss at the validation length with the plan's spans (None: dense SDPA)."""
    r = opts.response_tokens
    logits = run.forward([{"input_ids": b} for b in batches], attention=None if plan is None else _span_attention(plan),
                         logits=slice(-r - 1, -1))
    total = sum(float(_response_loss(lg, ids, r)) * ids.shape[0] for lg, ids in zip(logits, batches))
    return total / sum(int(b.shape[0]) for b in batches)


def calibrate(run: LLMCalibration, opts: CalibOptions) -> MoAPlan:
    """The whole pipeline (module docstring); ``opts`` are resolved against the model's context length."""
    ident = run.geometry.identity
    opts = opts.resolve(int(run.geometry.max_position_embeddings or 1 << 30))
    cands = candidates(opts)
    spans = HeadSpans(tuple(a for a, _ in cands), tuple(b for _, b in cands), opts.min_span)
    constrained = sorted(set(opts.lengths) | {opts.max_len})
    densities = [candidate_density(cands, n, opts) for n in constrained]
    select([torch.zeros(1, 1, len(cands))], densities, opts.density, [0.0])  # fail fast when the budget is impossible

    stream = _context_ids(run.tokenizer, opts.data)
    losses = {}
    for j, n in enumerate(progress(opts.lengths, desc="moa: influence profile")):
        batches = make_samples(run, stream, n, opts, offset=(j * 7919) % stream.numel())
        losses[n] = profile(run, batches, opts, spans, ident)
    norm = [losses[n] / max(float(losses[n].abs().amax(-1).sum()), 1e-30) for n in opts.lengths]
    weightings = [[1.0 if i == j else 0.0 for i in range(len(norm))] for j in range(len(norm))]
    weightings.append([1.0 / len(norm)] * len(norm))
    plans, picks = [], []
    for w in weightings:
        chosen = select(norm, densities, opts.density, w)
        if chosen in picks:
            continue
        picks.append(chosen)
        alphas = [[cands[c][0] for c in row] for row in chosen]
        betas = [[cands[c][1] for c in row] for row in chosen]
        plans.append((w, make_plan(ident, alphas, betas, sink=opts.sink, min_span=opts.min_span, density=opts.density)))

    val_batches = make_samples(run, stream, opts.validate_length, opts, offset=(len(opts.lengths) * 7919 + 104729)
                               % stream.numel())
    dense = validation_loss(run, val_batches, opts, None)
    scores = [validation_loss(run, val_batches, opts, p) for _, p in progress(plans, desc="moa: validation")]
    best = min(range(len(plans)), key=lambda i: scores[i])
    w, plan = plans[best]
    chosen = picks[best]
    # references: the widest one-span-for-every-head plans under the same density budget (StreamingLLM's
    # fixed window, and an elastic span), validated too; one wins when it beats every head-specific plan
    # (the milp adds first-order per-head estimates, which can make deep cuts to a few heads look cheap)
    refs = uniform_references(ident, opts, constrained)
    ref_scores = {name: validation_loss(run, val_batches, opts, p) for name, p in refs.items()}
    winner = min(ref_scores, key=ref_scores.get, default=None)
    uniform = winner is not None and ref_scores[winner] < scores[best]
    info = {
        "lengths": list(opts.lengths), "max_len": opts.max_len, "validate_length": opts.validate_length,
        "samples": opts.samples, "response_tokens": opts.response_tokens, "target": opts.target, "data": opts.data,
        "candidates": {"alpha_step": opts.alpha_step, "alpha_multiples": list(ALPHA_MULTIPLES), "betas": opts.betas},
        "density_at": {str(n): plan.density_at(n) for n in constrained + [opts.validate_length]},
        "validation": {"dense_loss": dense, "plans": [{"weights": pw, "loss": s} for (pw, _), s in zip(plans, scores)],
                       "chosen": best, "uniform": ref_scores, "result": winner if uniform else "moa"},
    }
    if uniform:
        plan = refs[winner]
        info["density_at"] = {str(n): plan.density_at(n) for n in constrained + [opts.validate_length]}
        return uniform_plan(ident, plan.layers[0]["alpha"][0], plan.layers[0]["beta"][0], sink=opts.sink,
                            min_span=opts.min_span, density=opts.density, calibration=info)
    return make_plan(ident, [[a for a in layer["alpha"]] for layer in plan.layers],
                     [[b for b in layer["beta"]] for layer in plan.layers], sink=opts.sink, min_span=opts.min_span,
                     density=opts.density, calibration=info,
                     losses=[[float(losses[opts.lengths[-1]][i, h, c]) for h, c in enumerate(row)]
                             for i, row in enumerate(chosen)])

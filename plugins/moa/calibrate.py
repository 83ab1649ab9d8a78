"""``overdrive calibrate --method moa``: per-KV-head elastic spans (alpha, beta) under a density budget.

Pipeline (``calibrate(model, tokenizer, opts)``) on a transformers causal LM:

1. **Data.** For every profile length ``N`` (``--lengths``, default ``M/4, M/2`` of ``M = --max-len``) and the
   validation length, ``--samples`` sequences: a context of ``N - R`` tokens from the text (``--data``) and a
   response of ``R = --response-tokens`` tokens that the dense model generates greedily (``--target dense``,
   MoA's recipe: the loss measures how far sparse attention moves the dense model's own answer), or simply
   ``N`` tokens of the text whose last ``R`` are the target (``--target text``: plain language modelling).
2. **Influence profile.** One forward + backward of the response-only LM loss per sample, attention through
   SDPA with q, k, v and the attention output O recorded per layer (keyed by ``layer_idx``) and O's
   gradient kept. Then, per layer and in query chunks (never all layers' attention matrices at once), the
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

import argparse
import contextlib
import contextvars
import dataclasses
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch

from overdrive.attention_probe import attention_function
from overdrive.config import ConfigError, read_jsonl
from overdrive.contracts.kv_cache import HeadSpans, ModelIdentity
from overdrive.kernels.span_attention import span_prefill_attention
from overdrive.progress import progress

from .config import MoAPlan, make_plan, uniform_plan

ALPHA_MULTIPLES = (-2, -1, 0, 1, 2, 4, 8)
TARGETS = ("dense", "text")
ESTIMATES = ("row", "entry")
PROBE = "overdrive_moa_probe"

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


# ------------------------------------------------------------------------------------- options
@dataclasses.dataclass
class CalibOptions:
    density: float = 0.5
    max_len: int = 0  # 0: min(max_position_embeddings, 16384)
    lengths: tuple[int, ...] = ()  # (): (M/4, M/2)
    validate_length: int = 0  # 0: 3M/4
    samples: int = 2
    batch_size: int = 1
    response_tokens: int = 0  # 0: min(64, shortest length / 8)
    target: str = "dense"  # "dense": the dense model's greedy answer (MoA); "text": the text's own continuation
    sink: int = 64
    min_span: int = 128
    alpha_step: int = 0  # 0: M / 16
    betas: int = 9
    data: str = "builtin"
    estimate: str = "row"  # "row": each query row's drop renormalised exactly; "entry": MoA's per-entry sum
    profile_cache: str = ""  # a folder: influence profiles are kept there and reused (they do not depend on the density)

    def resolve(self, max_positions: int) -> "CalibOptions":
        """Fill the length defaults from the model's context and check everything (ConfigError names the option)."""
        o = dataclasses.replace(self)
        if not 0.0 < o.density <= 1.0:
            raise ConfigError(f"--density must be in (0, 1], got {o.density}")
        if o.max_len <= 0:
            o.max_len = min(int(max_positions), 16384)
        if o.max_len > max_positions:
            raise ConfigError(f"--max-len {o.max_len} exceeds the model's context ({max_positions} positions)")
        if not o.lengths:
            o.lengths = (o.max_len // 4, o.max_len // 2)
        if o.validate_length <= 0:
            o.validate_length = 3 * o.max_len // 4
        if o.alpha_step <= 0:
            o.alpha_step = max(1, o.max_len // 16)
        if o.estimate not in ESTIMATES:
            raise ConfigError(f"--estimate must be one of {ESTIMATES}, got {o.estimate!r}")
        if o.target not in TARGETS:
            raise ConfigError(f"--target must be one of {TARGETS}, got {o.target!r}")
        if o.response_tokens <= 0:
            o.response_tokens = max(1, min(64, min(o.lengths) // 8))
        for name, n in [("--lengths", x) for x in o.lengths] + [("--validate-length", o.validate_length)]:
            if not o.response_tokens < n <= o.max_len:
                raise ConfigError(f"{name} {n} must be above --response-tokens ({o.response_tokens}) and at most "
                                  f"--max-len ({o.max_len})")
        if o.validate_length in o.lengths:
            raise ConfigError(f"--validate-length {o.validate_length} must differ from the profile lengths "
                              f"{list(o.lengths)} (validation is at an unseen length)")
        if o.sink < 0 or o.min_span < max(1, o.sink):
            raise ConfigError(f"--min-span ({o.min_span}) must be >= max(1, --sink = {o.sink})")
        if o.samples < 1 or o.batch_size < 1 or o.betas < 2:
            raise ConfigError(f"--samples ({o.samples}) and --batch-size ({o.batch_size}) must be >= 1, --betas "
                              f"({o.betas}) >= 2")
        return o


def candidates(opts: CalibOptions) -> list[tuple[float, float]]:
    """(alpha, beta) pairs: the alpha grid times the beta grid."""
    betas = [i / (opts.betas - 1) for i in range(opts.betas)]
    return [(float(m * opts.alpha_step), b) for m in ALPHA_MULTIPLES for b in betas]


def candidate_density(cands: Sequence[tuple[float, float]], length: int, opts: CalibOptions) -> torch.Tensor:
    """(C,) density of each candidate at ``length`` (per-query rule, float64)."""
    spans = HeadSpans(tuple(a for a, _ in cands), tuple(b for _, b in cands), opts.min_span)
    return torch.tensor(spans.density(length, opts.sink), dtype=torch.float64)


# ------------------------------------------------------------------------------------- probing
_RECORDER: contextvars.ContextVar["_Recorder | None"] = contextvars.ContextVar("moa_recorder", default=None)


@dataclasses.dataclass
class _Recorder:
    """Profiling: record q/k/v/O per layer. Validation: ``spans`` per layer are applied instead."""

    record: bool = True
    spans: list[HeadSpans] | None = None
    sink: int = 0
    layers: dict = dataclasses.field(default_factory=dict)


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: SDPA while profiling (recording), span attention while validating."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _RECORDER.get()
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if rec is not None and rec.spans is not None:
        b, hq, n, d = query.shape
        fmt = rec.spans[module.layer_idx]
        starts = fmt.starts(torch.arange(1, n + 1, device=query.device), rec.sink).repeat(b, 1)
        q, k, v = (t.transpose(1, 2).reshape(b * n, t.shape[1], d) for t in (query, key, value))
        out = span_prefill_attention(q, k, v, [i * n for i in range(b + 1)], starts, rec.sink, scale)
        return out.view(b, n, hq, d), None
    out, w = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scale,
                                    **kwargs)
    if rec is not None and rec.record:
        out.retain_grad()
        rec.layers[module.layer_idx] = (query.detach(), key.detach(), value.detach(), out, scale)
    return out, w


def probing(model: torch.nn.Module, rec: _Recorder) -> contextlib.AbstractContextManager[_Recorder]:
    """Run ``model`` with the probe attention function; restores the previous implementation."""
    return attention_function(model, PROBE, _probe_attention, _RECORDER, rec)


# ------------------------------------------------------------------------------------ influence
def _attention_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                      scale: float, budget: int = 1 << 24
                      ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield (first query, end, A, T) per query chunk, both (B, Hq, chunk, N) in float32 or wider: the causal
    attention ``A`` and ``T_ij = -A_ij (g_ij - sum_k A_ik g_ik)`` with ``g_ij = dO_i . v_j`` (zero off the
    causal part). q (B, Hq, N, D), k/v (B, Hk, N, D), out/dout (B, N, Hq, D)."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    o, do = out.detach().to(ct).transpose(1, 2), dout.to(ct).transpose(1, 2)  # (B, Hq, N, D)
    kk, vv = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    step = max(1, budget // max(1, b * hq * n))
    keys = torch.arange(n, device=q.device)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        causal = keys[None, :] <= torch.arange(c0, c1, device=q.device)[:, None]  # (c, N)
        s = (q[:, :, c0:c1] @ kk.transpose(-1, -2)) * scale
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        g = do[:, :, c0:c1] @ vv.transpose(-1, -2)  # dL/dA
        dot = (do[:, :, c0:c1] * o[:, :, c0:c1]).sum(-1, keepdim=True)  # sum_k A_ik g_ik
        yield c0, c1, a, (-a * (g - dot)).masked_fill(~causal, 0.0)


def influence_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                     scale: float, budget: int = 1 << 24) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (first query, end, I) with I (Hk, chunk, N): the masking influence summed over the batch and over
    the query heads of each KV group. q (B, Hq, N, D), k/v (B, Hk, N, D), out/dout (B, N, Hq, D)."""
    b, hq = q.shape[:2]
    hk = k.shape[1]
    for c0, c1, a, t in _attention_chunks(q, k, v, out, dout, scale, budget):
        infl = t / (1.0 - a).clamp_min(1e-6)
        yield c0, c1, infl.view(b, hk, hq // hk, c1 - c0, -1).sum(dim=(0, 2))



def _dropped(qlen: torch.Tensor, spans: HeadSpans, sink: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (c, C): query of length ``qlen`` drops keys [lo, hi) under candidate c."""
    st = spans.starts(qlen, sink).clamp(max=n)  # (c, C)
    lo = torch.clamp(qlen, max=sink)[:, None].expand_as(st)
    return lo, torch.maximum(st, lo)


def _range_sums(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x (..., c, N): per row, the sums of x over [lo, hi) (c, C) in float64 -> (..., c, C)."""
    pref = torch.nn.functional.pad(x.double().cumsum(-1), (1, 0))  # sum of keys < x
    shape = pref.shape[:-1] + lo.shape[-1:]
    return pref.gather(-1, hi.expand(shape)) - pref.gather(-1, lo.expand(shape))


def candidate_losses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                     scale: float, spans: HeadSpans, sink: int, estimate: str = "entry") -> torch.Tensor:
    """(Hk, C): for each KV head and candidate (the C "heads" of ``spans``), the first-order loss change of
    dropping the entries the candidate drops (query i drops keys [sink, start_c(i + 1))), summed over the
    batch, the queries and the query heads of the KV group.

    ``estimate="row"``: each query row's drop is taken as a whole: the row renormalised over what it keeps
    gives ``O'_i = (O_i - sum_D A_ij v_j) / (1 - m_i)`` (``m_i`` the dropped mass), exact, and the loss is
    linearised in O only: ``dL_i = dO_i . (O'_i - O_i) = sum_D T_ij / (1 - m_i)``.
    ``estimate="entry"``: MoA's per-entry influence ``I_ij = T_ij / (1 - A_ij)`` summed over the dropped
    entries (each entry's drop alone, then added): it misses the ``1 / (1 - m_i)`` a deep cut brings."""
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    n = q.shape[2]
    hk = k.shape[1]
    total = torch.zeros(hk, spans.num_heads, dtype=torch.float64, device=q.device)
    if estimate == "entry":
        for c0, c1, infl in influence_chunks(q, k, v, out, dout, scale):
            lo, hi = _dropped(torch.arange(c0 + 1, c1 + 1, device=q.device), spans, sink, n)
            total += _range_sums(infl, lo, hi).sum(1)
        return total
    b, hq = q.shape[:2]
    for c0, c1, a, t in _attention_chunks(q, k, v, out, dout, scale):
        lo, hi = _dropped(torch.arange(c0 + 1, c1 + 1, device=q.device), spans, sink, n)
        kept = (1.0 - _range_sums(a, lo, hi)).clamp_min(1e-9)  # (B, Hq, c, C)
        row = _range_sums(t, lo, hi) / kept
        total += row.view(b, hk, hq // hk, c1 - c0, -1).sum(dim=(0, 2, 3))
    return total


# ------------------------------------------------------------------------------------ selection
def select(losses: Sequence[torch.Tensor], densities: Sequence[torch.Tensor], budget: float,
           weights: Sequence[float]) -> list[list[int]]:
    """One candidate per (layer, KV head) minimising ``sum_n weights[n] * losses[n]`` (each ``(L, Hk, C)``) with the
    mean density at every ``densities[n]`` (``(C,)``, lengths with a constraint) at most ``budget``
    (``scipy.optimize.milp``). Returns the chosen candidate index per layer and KV head."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, heads, cands = losses[0].shape if losses else (0, 0, densities[0].numel())
    units = layers * heads
    lowest = [float(d.min()) for d in densities]
    if any(x > budget + 1e-12 for x in lowest):
        i = max(range(len(lowest)), key=lambda j: lowest[j])
        raise ConfigError(f"--density {budget} cannot be met: the sparsest candidate reads {lowest[i]:.3f} of the "
                          "attention entries at one of the constrained lengths; use longer --lengths / --max-len or a "
                          "smaller --min-span / --sink")
    c = np.zeros(units * cands)
    for w, loss in zip(weights, losses):
        c += w * loss.reshape(-1).double().numpy()
    eq = np.zeros((units, units * cands))
    for u in range(units):
        eq[u, u * cands:(u + 1) * cands] = 1.0
    dens = np.stack([np.tile(d.double().numpy(), units) / units for d in densities])
    res = milp(c, integrality=np.ones(units * cands), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(eq, 1, 1), LinearConstraint(dens, -np.inf, budget)])
    if not res.success:
        raise ConfigError(f"MoA selection failed: {res.message}")
    x = res.x.reshape(layers, heads, cands)
    return [[int(x[i, h].argmax()) for h in range(heads)] for i in range(layers)]


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
def make_samples(model: torch.nn.Module, stream: torch.Tensor, length: int, opts: CalibOptions, offset: int
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
    out = []
    for ctx in flat.split(opts.batch_size):
        gen = model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=r, min_new_tokens=r,
                             do_sample=False, pad_token_id=0)
        out.append(gen[:, :length])
    return out


def _response_loss(model: torch.nn.Module, ids: torch.Tensor, r: int, embeds: torch.Tensor | None = None
                   ) -> torch.Tensor:
    kw = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
    logits = model(**kw, use_cache=False).logits[:, -r - 1:-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -r:].reshape(-1))


def profile(model: torch.nn.Module, batches: Sequence[torch.Tensor], opts: CalibOptions, spans: HeadSpans,
            ident: ModelIdentity) -> torch.Tensor:
    """(L, Hk, C) candidate losses at one length, averaged over samples."""
    total = torch.zeros(ident.num_layers, ident.num_kv_heads, spans.num_heads, dtype=torch.float64)
    count = sum(int(b.shape[0]) for b in batches)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with probing(model, _Recorder()) as rec:
            for ids in batches:
                rec.layers = {}
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                _response_loss(model, ids, opts.response_tokens, emb).mul(ids.shape[0]).backward()
                for i in range(ident.num_layers):
                    q, k, v, out, scale = rec.layers[i]
                    if out.grad is None:
                        raise RuntimeError("no gradient reached an attention output; is the model's attention on "
                                           "the probe path?")
                    total[i] += candidate_losses(q, k, v, out, out.grad, scale, spans, opts.sink, opts.estimate).cpu()
                rec.layers = {}
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return total / count


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[torch.Tensor], opts: CalibOptions,
                    plan: MoAPlan | None) -> float:
    """Mean response loss at the validation length with the plan's spans (None: dense SDPA)."""
    rec = _Recorder(record=False, spans=None if plan is None else [plan.head_spans(i) for i in range(len(plan.layers))],
                    sink=0 if plan is None else plan.sink)
    total, count = 0.0, 0
    with probing(model, rec):
        for ids in batches:
            total += float(_response_loss(model, ids, opts.response_tokens)) * ids.shape[0]
            count += ids.shape[0]
    return total / count


def uniform_references(ident: ModelIdentity, opts: CalibOptions, lengths: Sequence[int]) -> dict[str, MoAPlan]:
    """The widest plans giving every head the same span whose mean density is within ``opts.density`` at
    every length in ``lengths`` (the budget the milp meets): a fixed window (StreamingLLM: ``alpha = W``,
    ``beta = 0``) and an elastic span (``alpha = 0``, ``beta``); a reference no span fits is left out."""
    def fits(p: MoAPlan) -> bool:
        return all(p.density_at(n) <= opts.density + 1e-9 for n in lengths)

    def make(name: str, x: float) -> MoAPlan:
        a, b = (x, 0.0) if name == "streamingllm" else (0.0, x)
        return uniform_plan(ident, a, b, sink=opts.sink, min_span=opts.min_span)

    out = {}
    for name, lo, hi in (("streamingllm", 0.0, float(max(lengths))), ("uniform-elastic", 0.0, 1.0)):
        if not fits(make(name, lo)):
            continue
        for _ in range(40):  # density grows with the window / beta: bisect for the widest that fits
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(make(name, mid)) else (lo, mid)
        if name == "streamingllm":  # spans are ceil(alpha + beta N): the bisection ends just below an integer
            lo = float(int(lo + 1e-6)) if fits(make(name, float(int(lo + 1e-6)))) else float(int(lo))
        out[name] = make(name, lo)
    return out


def _profile_path(model: torch.nn.Module, stream: torch.Tensor, length: int, offset: int,
                  cands: Sequence[tuple[float, float]], opts: CalibOptions) -> Path | None:
    """Where the profile of this length lives in ``opts.profile_cache`` (None: no cache). The name hashes what
    the profile depends on: the model (identity, path, weights' first values), the calibration tokens, the
    length and offset, samples, response tokens, target, sink, min span, the candidates and the estimate."""
    if not opts.profile_cache:
        return None
    import hashlib
    import json

    h = hashlib.sha256()
    first = next(model.parameters()).detach().reshape(-1)[:4096].float().cpu().numpy().tobytes()
    h.update(json.dumps({"identity": ModelIdentity.from_hf_config(model.config).to_dict(),
                         "path": str(getattr(model.config, "_name_or_path", "")), "length": length, "offset": offset,
                         "samples": opts.samples, "batch": opts.batch_size, "response": opts.response_tokens,
                         "target": opts.target, "sink": opts.sink, "min_span": opts.min_span, "cands": list(cands),
                         "estimate": opts.estimate}, sort_keys=True).encode())
    h.update(first)
    h.update(stream.numpy().tobytes())
    return Path(opts.profile_cache) / f"moa-profile-{length}-{h.hexdigest()[:20]}.safetensors"


def calibrate(model: torch.nn.Module, tokenizer, opts: CalibOptions) -> MoAPlan:
    """The whole pipeline (module docstring); ``opts`` are resolved against the model's context length."""
    ident = ModelIdentity.from_hf_config(model.config)
    text_cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    opts = opts.resolve(int(getattr(text_cfg, "max_position_embeddings", 0) or 1 << 30))
    cands = candidates(opts)
    spans = HeadSpans(tuple(a for a, _ in cands), tuple(b for _, b in cands), opts.min_span)
    constrained = sorted(set(opts.lengths) | {opts.max_len})
    densities = [candidate_density(cands, n, opts) for n in constrained]
    select([torch.zeros(1, 1, len(cands))], densities, opts.density, [0.0])  # fail fast when the budget is impossible

    model.eval()
    stream = _context_ids(tokenizer, opts.data)
    losses = {}
    for j, n in enumerate(progress(opts.lengths, desc="moa: influence profile")):
        offset = (j * 7919) % stream.numel()
        cache = _profile_path(model, stream, n, offset, cands, opts)
        if cache is not None and cache.is_file():
            from safetensors.torch import load_file

            losses[n] = load_file(str(cache))["losses"]
            continue
        losses[n] = profile(model, make_samples(model, stream, n, opts, offset=offset), opts, spans, ident)
        if cache is not None:
            from safetensors.torch import save_file

            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            save_file({"losses": losses[n].contiguous()}, str(tmp))
            tmp.replace(cache)
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

    val_batches = make_samples(model, stream, opts.validate_length, opts, offset=(len(opts.lengths) * 7919 + 104729)
                               % stream.numel())
    dense = validation_loss(model, val_batches, opts, None)
    scores = [validation_loss(model, val_batches, opts, p) for _, p in progress(plans, desc="moa: validation")]
    best = min(range(len(plans)), key=lambda i: scores[i])
    w, plan = plans[best]
    chosen = picks[best]
    # references: the widest one-span-for-every-head plans under the same density budget (StreamingLLM's
    # fixed window, and an elastic span), validated too; one wins when it beats every head-specific plan
    # (the milp adds first-order per-head estimates, which can make deep cuts to a few heads look cheap)
    refs = uniform_references(ident, opts, constrained)
    ref_scores = {name: validation_loss(model, val_batches, opts, p) for name, p in refs.items()}
    winner = min(ref_scores, key=ref_scores.get, default=None)
    uniform = winner is not None and ref_scores[winner] < scores[best]
    info = {
        "lengths": list(opts.lengths), "max_len": opts.max_len, "validate_length": opts.validate_length,
        "samples": opts.samples, "response_tokens": opts.response_tokens, "target": opts.target, "data": opts.data,
        "objective": {"loss": "cross-entropy of the last response_tokens tokens of each sample",
                      "target": opts.target, "estimate": opts.estimate, "density": opts.density,
                      "constrained_lengths": constrained, "selection": "scipy milp, one solve per length weighting; "
                      "the lowest validation loss among them and the uniform references is written"},
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


def validation_table(cal: dict) -> str:
    """The table calibration chose by: every candidate plan's and reference's validation loss (and vs dense)."""
    val = cal["validation"]
    dense = val["dense_loss"]
    rows = [("dense", dense, "")]
    for i, p in enumerate(val["plans"]):
        rows.append((f"moa (length weights {', '.join(f'{w:g}' for w in p['weights'])})", p["loss"],
                     " <- written" if val["result"] == "moa" and i == val["chosen"] else ""))
    for name, loss in val["uniform"].items():
        rows.append((f"{name} (every head the same span)", loss, " <- written" if val["result"] == name else ""))
    lines = [f"validation loss at {cal['validate_length']} tokens ({cal['samples']} samples, loss on the last "
             f"{cal['response_tokens']} tokens):", f"  {'plan':<48} {'loss':>8} {'vs dense':>9}"]
    lines += [f"  {name:<48} {loss:8.4f} {loss - dense:+9.4f}{mark}" for name, loss, mark in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers causal-LM checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="plan JSON to write (atomically)")
    p.add_argument("--density", type=float, default=0.5,
                   help="largest mean fraction of causal attention entries read, at every profile length and --max-len")
    p.add_argument("--max-len", type=int, default=0,
                   help="longest context the plan is for (density constraint there too); default min(model context, 16384)")
    p.add_argument("--lengths", default="", help="profile lengths, comma-separated (default: max-len/4, max-len/2)")
    p.add_argument("--validate-length", type=int, default=0, help="unseen validation length (default 3/4 max-len)")
    p.add_argument("--samples", type=int, default=2, help="calibration sequences per length")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--response-tokens", type=int, default=0,
                   help="tokens the dense model answers after each context; the loss is on them (default min(64, L/8))")
    p.add_argument("--target", choices=TARGETS, default="dense",
                   help="what the response tokens are: the dense model's greedy answer (MoA) or the text's own next tokens")
    p.add_argument("--sink", type=int, default=64, help="leading tokens every head reads")
    p.add_argument("--min-span", type=int, default=128, help="smallest span of any head")
    p.add_argument("--alpha-step", type=int, default=0, help="alpha grid step (default max-len/16)")
    p.add_argument("--betas", type=int, default=9, help="beta grid size over [0, 1]")
    p.add_argument("--data", type=Path, default=None, help="calibration text (.txt, or .jsonl with 'text')")
    p.add_argument("--estimate", choices=ESTIMATES, default="row",
                   help="influence of a candidate's drop: 'row' (each query row renormalised exactly, the loss "
                        "linearised in the attention output) or 'entry' (MoA's per-entry influence, summed)")
    p.add_argument("--profile-cache", type=Path, default=None,
                   help="folder to keep influence profiles in and reuse (they do not depend on --density)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype to load the model in for calibration")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        try:
            lengths = tuple(int(x) for x in str(args.lengths).split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--lengths {args.lengths!r}: expected comma-separated integers") from None
        opts = CalibOptions(density=args.density, max_len=args.max_len, lengths=lengths,
                            validate_length=args.validate_length, samples=args.samples, batch_size=args.batch_size,
                            response_tokens=args.response_tokens, target=args.target, sink=args.sink, min_span=args.min_span,
                            alpha_step=args.alpha_step, betas=args.betas, data=str(args.data) if args.data else "builtin",
                            estimate=args.estimate, profile_cache=str(args.profile_cache or ""))
        if not (args.model / "config.json").is_file():
            raise ConfigError(f"--model {args.model}: no config.json (expected a transformers checkpoint directory)")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        tok = AutoTokenizer.from_pretrained(args.model)
        plan = calibrate(model, tok, opts)
    except ConfigError as e:
        print(f"overdrive calibrate --method moa: {e}", file=sys.stderr)
        return 2
    plan.save(args.output)
    ident = plan.identity
    cal = plan.calibration
    dens = ", ".join(f"{n}: {d:.3f}" for n, d in cal["density_at"].items())
    val = cal["validation"]
    print(f"wrote {args.output}: {ident.architecture}, {ident.num_layers} layers x {ident.num_kv_heads} KV heads; "
          f"density {dens} (budget {plan.density}; target {cal['target']}, estimate {cal['objective']['estimate']}, "
          f"data {cal['data']})")
    print(validation_table(cal))
    if val["result"] != "moa":
        print(f"overdrive calibrate --method moa: no head-specific plan beat a uniform span of the same reads at "
              f"{cal['validate_length']} tokens; wrote the {val['result']} plan (every head the same span)",
              file=sys.stderr)
    return 0

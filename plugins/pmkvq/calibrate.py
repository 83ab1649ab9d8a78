"""``overdrive calibrate --method pmkvq``: per-layer KV bit widths under a memory budget, and key scales.

Pipeline (``calibrate(model, batches, opts)``) on a transformers causal LM:

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
4. **Sensitivity.** One backward pass of the LM loss per batch, on the reparameterised model. The
   K (after RoPE) and V of every layer and their gradients are recorded by the *same* attention call,
   keyed by the layer index, so activation and gradient are paired layer by layer by construction
   (PM-KVQ's reference zips forward activations with backward-hook gradients, which arrive in the
   opposite layer order). ``S[l][b] = mean |(Q_b(K) - K) * dL/dK| + mean |(Q_b(V) - V) * dL/dV|``.
5. **Allocation.** An integer program (``scipy.optimize.milp``): one width per layer minimising the
   total sensitivity, with the sum of the layers' peak memory at ``max_len`` tokens (sink and window
   at full precision, :func:`.config.layer_peak_bytes`) within the budget. The plan records each
   layer's width and its peak memory as its budget.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import re
import sys
from pathlib import Path
from typing import Sequence

import torch

from overdrive.attention_probe import attention_function
from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import ModelIdentity
from overdrive.kernels import kv_dequantize, kv_quantize
from overdrive.progress import progress

from .config import BITS, PMKVQPlan, head_group, layer_peak_bytes, make_plan

ALPHAS = [round(1.0 - 0.05 * i, 2) for i in range(20)]  # 1.0, 0.95, ..., 0.05
PROBE = "overdrive_pmkvq_probe"

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


# ------------------------------------------------------------------------------------ budgets
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(spec: str, ident: ModelIdentity, max_len: int) -> int:
    """Bytes of KV memory for one ``max_len``-token sequence, from ``"4GiB"``, ``"300MB"`` or ``"3.5bpe"``.

    ``bpe`` (or ``bits``): average bits per cached K/V element, i.e. bytes =
    bits / 8 * 2 * layers * KV heads * head size * max_len.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(spec))
    if not m:
        raise ConfigError(f"--budget {spec!r}: expected a number with a unit, e.g. 2GiB, 300MiB or 3.5bpe")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("bpe", "bits", "bit"):
        elems = 2 * ident.num_layers * ident.num_kv_heads * ident.head_size * max_len
        return int(value / 8 * elems)
    if unit not in _UNITS:
        raise ConfigError(f"--budget {spec!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, KiB, MiB, GiB or bpe")
    return int(value * _UNITS[unit])


def allocate(sensitivity: Sequence[dict[int, float]], memory: Sequence[dict[int, int]], budget: int
             ) -> list[int]:
    """One width per layer minimising total sensitivity with total memory <= budget (``scipy.optimize.milp``)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers = len(sensitivity)
    cands = [sorted(s) for s in sensitivity]
    minimum = sum(min(memory[i][b] for b in cands[i]) for i in range(layers))
    if budget < minimum:
        low = sorted({min(c) for c in cands})
        raise ConfigError(
            f"budget of {budget} bytes is below the minimum of {minimum} bytes ({'/'.join(map(str, low))} bits on "
            f"every layer); raise --budget to at least {minimum} bytes ({minimum / 2**20:.2f} MiB) or shorten --max-len")
    index = [(i, b) for i in range(layers) for b in cands[i]]
    n = len(index)
    c = np.array([sensitivity[i][b] for i, b in index], dtype=np.float64)
    eq = np.zeros((layers, n))
    for j, (i, _) in enumerate(index):
        eq[i, j] = 1.0
    mem = np.array([[memory[i][b] for i, b in index]], dtype=np.float64)
    res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(eq, 1, 1), LinearConstraint(mem, 0, float(budget))])
    if not res.success:
        raise ConfigError(f"PM-KVQ allocation failed: {res.message}")
    chosen = [0] * layers
    for j, (i, b) in enumerate(index):
        if res.x[j] > 0.5:
            chosen[i] = b
    return chosen


# ------------------------------------------------------------------------------------- probing
_RECORDER: contextvars.ContextVar["_Recorder | None"] = contextvars.ContextVar("pmkvq_recorder", default=None)


@dataclasses.dataclass
class _Recorder:
    retain_grad: bool = False
    q: dict = dataclasses.field(default_factory=dict)
    k: dict = dataclasses.field(default_factory=dict)
    v: dict = dataclasses.field(default_factory=dict)
    keep_q: bool = True


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: sdpa, recording q/k/v (after RoPE) by ``module.layer_idx``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _RECORDER.get()
    if rec is not None:
        i = module.layer_idx
        if rec.retain_grad:
            key.retain_grad()
            value.retain_grad()
        if rec.keep_q:
            rec.q[i] = query
        rec.k[i], rec.v[i] = key, value
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def probing(model: torch.nn.Module, rec: _Recorder) -> contextlib.AbstractContextManager[_Recorder]:
    """Run ``model`` with the recording attention function; restores the previous implementation."""
    return attention_function(model, PROBE, _probe_attention, _RECORDER, rec)


def position_ids_for(seq_len: int, max_len: int, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stretched position ids (positional interpolation): stride ``max(1, max_len // seq_len)``."""
    stride = max(1, max_len // seq_len)
    return (torch.arange(seq_len, device=device) * stride).expand(batch, seq_len)


# -------------------------------------------------------------------------- statistics, search
def qdq(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize-dequantize along the last dim with PM-KVQ's per-token group quantizer (float32 math)."""
    p, s, z = kv_quantize(x.detach().float(), bits, group)
    return kv_dequantize(p, s, z, bits, x.shape[-1], group, torch.float32)


def pair_max(absmax: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D) where channels c and c + D/2 both hold max of the two (rotary pairs)."""
    half = absmax.shape[-1] // 2
    m = torch.maximum(absmax[..., :half], absmax[..., half:])
    return torch.cat([m, m], dim=-1)


def scales_for(maxk: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = maxK ** alpha per (KV head, channel), normalised to geometric mean 1 per head."""
    s = maxk.double().clamp_min(1e-6) ** alpha
    s = s / torch.exp(torch.log(s).mean(dim=-1, keepdim=True))
    return s.float()


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, Hq, S, D), k/v (B, Hk, S, D) -> (B, Hq, S, D), float32, causal, GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def search_alpha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, maxk: torch.Tensor, group: int,
                 bits: int = 4, alphas: Sequence[float] = ALPHAS) -> tuple[float, float, float]:
    """(best alpha (0 = no scaling), its attention-output MSE, the MSE without scaling)."""
    q, k, v = q.float(), k.float(), v.float()
    ref = _causal_attention(q, k, v)
    vq = qdq(v, bits, group)
    rep = q.shape[1] // k.shape[1]

    def err(alpha: float) -> float:
        if alpha == 0:
            return float(((_causal_attention(q, qdq(k, bits, group), vq) - ref) ** 2).mean())
        s = scales_for(maxk, alpha)[None, :, None, :]  # (1, Hk, 1, D)
        kq = qdq(k / s, bits, group)
        qs = q * s.repeat_interleave(rep, 1)
        return float(((_causal_attention(qs, kq, vq) - ref) ** 2).mean())

    base = err(0.0)
    best, best_err = 0.0, base
    for a in alphas:
        e = err(a)
        if e < best_err:
            best, best_err = a, e
    return best, best_err, base


# ------------------------------------------------------------------------------------ pipeline
@dataclasses.dataclass
class CalibOptions:
    max_len: int
    budget: str
    candidate_bits: tuple[int, ...] = (4, 2)
    group_size: int = 128
    sink: int = 1
    window: int = 128
    seq_len: int = 256
    reparam: bool = True
    search_bits: int = 4
    data: str = "builtin"

    def __post_init__(self) -> None:
        if self.max_len <= 0 or self.seq_len <= 0:
            raise ConfigError(f"--max-len ({self.max_len}) and --seq-len ({self.seq_len}) must be positive")
        bad = [b for b in self.candidate_bits if b not in BITS]
        if bad or not self.candidate_bits:
            raise ConfigError(f"--bits {list(self.candidate_bits)}: each must be one of {BITS}")
        if self.search_bits not in BITS:
            raise ConfigError(f"search bits {self.search_bits} must be one of {BITS}")


@dataclasses.dataclass
class LayerStats:
    maxk: torch.Tensor  # (Hk, D), pair-shared
    alpha: float = 0.0
    search_err: float = float("nan")
    base_err: float = float("nan")


def _fp_bytes(model: torch.nn.Module) -> int:
    return 2 if next(model.parameters()).dtype in (torch.float16, torch.bfloat16) else 4


def collect_stats(model: torch.nn.Module, batches: Sequence[torch.Tensor], opts: CalibOptions, group: int
                  ) -> list[LayerStats]:
    """Steps 1-3: key maxima under positional interpolation and the alpha search (no grad)."""
    ident = ModelIdentity.from_hf_config(model.config)
    maxk = [torch.zeros(ident.num_kv_heads, ident.head_size) for _ in range(ident.num_layers)]
    keep: list[tuple[dict, dict, dict]] = []
    with torch.no_grad(), probing(model, _Recorder()) as rec:
        for ids in progress(batches, desc="pmkvq: key statistics"):
            rec.q, rec.k, rec.v = {}, {}, {}
            model(input_ids=ids, position_ids=position_ids_for(ids.shape[1], opts.max_len, ids.shape[0], ids.device),
                  use_cache=False)
            for i in range(ident.num_layers):
                maxk[i] = torch.maximum(maxk[i], rec.k[i].detach().abs().float().amax(dim=(0, 2)).cpu())
            keep.append((dict(rec.q), dict(rec.k), dict(rec.v)))
    stats = []
    for i in range(ident.num_layers):
        st = LayerStats(pair_max(maxk[i]))
        if opts.reparam:
            q = torch.cat([b[0][i] for b in keep]).detach()
            k = torch.cat([b[1][i] for b in keep]).detach()
            v = torch.cat([b[2][i] for b in keep]).detach()
            st.alpha, st.search_err, st.base_err = search_alpha(q, k, v, st.maxk, group, opts.search_bits)
        stats.append(st)
    return stats


def sensitivity(model: torch.nn.Module, batches: Sequence[torch.Tensor], opts: CalibOptions, group: int,
                bits: Sequence[int]) -> list[dict[int, float]]:
    """Step 4: S[layer][bits] from one LM-loss backward pass per batch (activations and gradients of a
    layer come from the same recorded attention call, keyed by layer index)."""
    ident = ModelIdentity.from_hf_config(model.config)
    total = [{b: 0.0 for b in bits} for _ in range(ident.num_layers)]
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with probing(model, _Recorder(retain_grad=True, keep_q=False)) as rec:
            for ids in progress(batches, desc="pmkvq: sensitivity"):
                rec.k, rec.v = {}, {}
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                pos = position_ids_for(ids.shape[1], opts.max_len, ids.shape[0], ids.device)
                out = model(inputs_embeds=emb, position_ids=pos, labels=ids, use_cache=False)
                out.loss.backward()
                for i in range(ident.num_layers):
                    terms = layer_sensitivity(rec.k[i], rec.k[i].grad, rec.v[i], rec.v[i].grad, group, bits)
                    for b in bits:
                        total[i][b] += terms[b] / len(batches)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return total


def layer_sensitivity(k: torch.Tensor, gk: torch.Tensor, v: torch.Tensor, gv: torch.Tensor, group: int,
                      bits: Sequence[int]) -> dict[int, float]:
    """mean |(Q_b(K) - K) * dL/dK| + mean |(Q_b(V) - V) * dL/dV| for each width b."""
    if gk is None or gv is None:
        raise RuntimeError("no gradient reached a layer's K/V; is the model's attention on the probe path?")
    k, v, gk, gv = k.detach().float(), v.detach().float(), gk.float(), gv.float()
    return {b: float(((qdq(k, b, group) - k) * gk).abs().mean() + ((qdq(v, b, group) - v) * gv).abs().mean())
            for b in bits}


def calibrate(model: torch.nn.Module, batches: Sequence[torch.Tensor], opts: CalibOptions) -> PMKVQPlan:
    """Run the whole pipeline (module docstring) on ``model`` (modified: key scales folded in)."""
    from .reparam import fold_scales

    ident = ModelIdentity.from_hf_config(model.config)
    group = head_group(ident.head_size, opts.group_size)
    budget = parse_budget(opts.budget, ident, opts.max_len)
    fp_bytes = _fp_bytes(model)
    bits = sorted(set(opts.candidate_bits), reverse=True)
    memory = [{b: layer_peak_bytes(b, opts.max_len, ident.num_kv_heads, ident.head_size, group, opts.sink,
                                   opts.window, fp_bytes) for b in bits} for _ in range(ident.num_layers)]
    # fail before any model work when even the smallest widths do not fit
    allocate([{b: 0.0 for b in bits} for _ in range(ident.num_layers)], memory, budget)

    model.eval()
    stats = collect_stats(model, batches, opts, group)
    key_scales = [scales_for(st.maxk, st.alpha).tolist() if opts.reparam and st.alpha > 0 else None for st in stats]
    scaled = make_plan(ident, [bits[0]] * ident.num_layers, opts.max_len, group_size=opts.group_size,
                       sink=opts.sink, window=opts.window, fp_bytes=fp_bytes, key_scales=key_scales)
    fold_scales(model, scaled)
    sens = sensitivity(model, batches, opts, group, bits)
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


# ------------------------------------------------------------------------------------- data, CLI
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="transformers causal-LM checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="plan JSON to write (atomically)")
    p.add_argument("--budget", required=True,
                   help="KV memory for one --max-len sequence: e.g. 2GiB, 300MiB, or average bits per element: 3bpe")
    p.add_argument("--max-len", required=True, type=int, help="longest sequence the budget must hold (tokens)")
    p.add_argument("--bits", default="4,2", help="candidate final widths per layer, comma-separated (16,8,4,2)")
    p.add_argument("--window", type=int, default=128, help="full-precision recent window, flushed in chunks of it")
    p.add_argument("--sink", type=int, default=1, help="leading tokens kept at full precision")
    p.add_argument("--group-size", type=int, default=128, help="largest channel group per scale/zero")
    p.add_argument("--data", type=Path, default=None, help="calibration text (.txt, or .jsonl with 'text')")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-reparam", action="store_true", help="skip the key-scale search")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype to load the model in for calibration")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        bits = tuple(int(x) for x in str(args.bits).split(",") if x.strip())
    except ValueError:
        print(f"overdrive calibrate: --bits {args.bits!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    try:
        opts = CalibOptions(max_len=args.max_len, budget=args.budget, candidate_bits=bits, group_size=args.group_size,
                            sink=args.sink, window=args.window, seq_len=args.seq_len, reparam=not args.no_reparam,
                            data=str(args.data) if args.data else "builtin")
        if not (args.model / "config.json").is_file():
            raise ConfigError(f"--model {args.model}: no config.json (expected a transformers checkpoint directory)")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        tok = AutoTokenizer.from_pretrained(args.model)
        batches = token_batches(tok, args.seq_len, args.samples, args.batch_size, args.data)
        plan = calibrate(model, batches, opts)
    except ConfigError as e:
        print(f"overdrive calibrate --method pmkvq: {e}", file=sys.stderr)
        return 2
    plan.save(args.output)
    ident = plan.identity
    mean_bits = sum(plan.layer_bits) / len(plan.layer_bits)
    print(f"wrote {args.output}: {ident.architecture}, {ident.num_layers} layers, per-layer bits {plan.layer_bits} "
          f"(mean {mean_bits:.2f}), {plan.budget_bytes} of {parse_budget(args.budget, ident, args.max_len)} budget "
          f"bytes at max_len {plan.max_len}")
    return 0

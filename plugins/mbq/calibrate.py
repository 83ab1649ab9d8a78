"""MBQ calibration: modality-weighted, gradient-reweighted AWQ-style scale search (and AWQ, RTN), and GPTQ.

Pipeline (``calibrate(run, samples, cfg)``), on a (vision-)language model loaded for calibration (the LLM
calibration layer, :func:`overdrive.contracts.llm_calibration.load_for_calibration`: one decoder block on
the device at a time, in float32):

1. **Modality masks** per sample: vision tokens (image/video placeholders) and caption tokens (the
   assistant's answer); other prompt tokens get weight 0 in MBQ's loss.
2. **Gradient reweighting** (MBQ only): one backward pass of the loss on caption tokens (the layer's
   block-wise backward); for each decoder layer, r = mean|dL/d out| over vision tokens / the same over
   caption tokens, at the attention output projection and at the MLP down projection; r is clamped
   from below by its median over layers.
3. **Scale search** (W4A8/W8A8: weights per-channel symmetric and activations per-token int8, both
   quantized inside the loop), block by block, for the groups (input norm -> q,k,v), (v -> o, when shapes
   allow), (post-attention norm -> gate, up), (up -> down): s = mean|x|^rho over the group's input
   channels (over every calibration token), rho in {0, 0.05, ..., 0.95}, normalised by sqrt(max * min);
   the loss is the token-weighted mean absolute (or squared) error of the group's outputs with weights
   quantized as Q(W * s) / s. Token weights: MBQ caption 1, vision r, others 0; AWQ every token 1. rho = 0
   is plain RTN, so the chosen scales never do worse than RTN on the data the loss is measured on. The
   best s is folded into the preceding norm or linear (the float model's function is unchanged).
   The loss is measured on at most ``search_tokens`` calibration tokens (whole sequences spread evenly
   over the data; 0: every token): the grid costs 20 forwards of each judged module, the dominant cost.
   Then the statistics pass over every token also gives the block's float outputs, which propagate to
   the next block (folding preserves the float function) instead of a third pass over the block.
4. ``distort``: each block is calibrated on the outputs of the already-quantized earlier blocks
   (their weights quantized; for W4A8/W8A8 their activations are not); otherwise the folded float
   block's outputs propagate.

5. **GPTQ** (baselines "gptq", "awq-gptq", "mbq-gptq"; :mod:`.gptq`), in the same block-by-block pass,
   after the block's scales are folded ("awq-gptq" / "mbq-gptq"; "gptq" folds none): one run of the
   block accumulates, on the device, the Hessian ``H = 2 X^T diag(w) X / sum(w)`` of each distinct linear
   input (q,k,v share one; gate,up share one; o; down) from the layer's recording hooks, with ``w`` MBQ's
   modality token weights for "mbq-gptq" (caption 1, vision r, other tokens 0) and 1 otherwise; every
   linear of the block is quantized by GPTQ against its Hessian and its weight replaced by the
   dequantized one, so the next block's inputs are the quantized block's outputs. GPTQ's codes, scales
   and zero points become the checkpoint's tensors (buffers :data:`GPTQ_BUFFERS` on the linears of
   the calibrated copy).

The loss of q,k,v is measured on the attention block's output and that of gate,up on the MLP's
output (the enclosing module, as AWQ does); v->o and up->down on their own linear outputs
(``scope="linear"`` judges every group on its own linear outputs); see docs/methods/mbq.md.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterable, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import BlockCall, CalibrationBlock, LLMCalibration, Recording

from .awq import (ENCLOSING, GRID, Group, GroupResult, block_groups, fold_scales, layer_groups, search,
                  search_group)
from .config import MBQConfig
from .data import CalibSample
from .gptq import ChannelSymmetric, GroupAsymmetric, Hessian, gptq, objective, rtn
from .quant import act8_tensors, fake_quant_act, fake_quant_weight, group_tensors

__all__ = ["ENCLOSING", "GPTQ_BASELINES", "GPTQOptions", "GRID", "CalibSample", "Group", "GroupResult", "calibrate",
           "calibrate_blocks", "fold_scales", "gradient_ratios", "layer_groups", "search_group",
           "search_group_on_module"]

#: default cap on the tokens the scale-search loss is measured on (statistics use every token)
SEARCH_TOKENS = 4096


# -------------------------------------------------------------------------- reweighting (MBQ)
def gradient_ratios(run: LLMCalibration, samples: Sequence[CalibSample]) -> list[dict[str, float]]:
    """Per decoder layer {"attn": r, "mlp": r}: mean |dL/dout| over vision / over caption tokens."""
    layers = run.geometry.num_layers
    sums = [{(b, k): 0.0 for b in ("attn", "mlp") for k in ("vis", "cap")} for _ in range(layers)]
    counts = {"vis": sum(int(s.vision_mask.sum()) for s in samples),
              "cap": sum(int(s.caption_mask.sum()) for s in samples)}

    def visit(block: CalibrationBlock, j: int, retained: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        vis, cap = samples[j].vision_mask.reshape(-1), samples[j].caption_mask.reshape(-1)
        for branch, role in (("attn", "o"), ("mlp", "down")):
            g = retained[role][1]
            a = g.detach().abs().float().mean(dim=-1).reshape(-1).cpu()  # per token
            sums[block.index][(branch, "vis")] += float(a[vis].sum())
            sums[block.index][(branch, "cap")] += float(a[cap].sum())

    def loss(logits: torch.Tensor, j: int) -> torch.Tensor:
        smp = samples[j]
        ids = smp.inputs["input_ids"]
        labels = torch.where(smp.caption_mask.reshape(ids.shape), ids, torch.full_like(ids, -100))
        lg = logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]),
                                                 labels[:, 1:].reshape(-1).to(lg.device), ignore_index=-100)

    run.backward([s.inputs for s in samples], loss, retain=("o", "down"), visit=visit, desc="mbq: gradient ratios")
    if counts["vis"] == 0 or counts["cap"] == 0:
        return [{"attn": 1.0, "mlp": 1.0} for _ in range(layers)]
    ratios = [{b: (s[(b, "vis")] / counts["vis"]) / max(s[(b, "cap")] / counts["cap"], 1e-30)
               for b in ("attn", "mlp")} for s in sums]
    for b in ("attn", "mlp"):
        med = float(torch.tensor([r[b] for r in ratios]).median())
        for r in ratios:
            r[b] = max(r[b], med)
    return ratios


# --------------------------------------------------------------------------------- the search
def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def search_group_on_module(group: Group, module: torch.nn.Module, rec: Recording, tok_w: torch.Tensor,
                           cfg: MBQConfig, mode: str, x_mean: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, float, float, float]:
    """Best scales for one group judged on the output of its enclosing ``module`` (as AWQ does: q,k,v
    on the attention block's output, gate,up on the MLP's output), from the recorded calls.

    For a candidate s the group's weights become Q(W s) / s (and, with int8 activations, each
    linear's input x becomes Qa(x / s) s), so the module computes Qa(x / s) Q(W s)^T exactly as the
    folded, quantized model will; every other weight of the module stays float. The module's float
    outputs (the reference) are the recorded ones.
    """
    if x_mean is None:
        x_mean = rec.input_rows().float().abs().mean(dim=0)
    x_mean = x_mean.clamp_min(1e-6)
    ref = rec.output_rows().float()
    saved = [lin.weight.detach().clone() for lin in group.linears]

    def evaluate(s: torch.Tensor) -> torch.Tensor:
        hooks = []
        for lin, w0 in zip(group.linears, saved):
            sw = s.to(w0.dtype)
            lin.weight.copy_(fake_quant_weight(w0 * sw[None, :], cfg) / sw[None, :])
            if cfg.act_bits == 8:
                hooks.append(lin.register_forward_pre_hook(
                    lambda _m, args, s=s: (fake_quant_act(args[0] / s.to(args[0].dtype)) * s.to(args[0].dtype),
                                           *args[1:])))
        try:
            return torch.cat([_first(module(*a, **k)).reshape(-1, ref.shape[-1]).float() for a, k in rec.calls])
        finally:
            for h in hooks:
                h.remove()
            for lin, w0 in zip(group.linears, saved):
                lin.weight.copy_(w0)

    return search(x_mean, evaluate, ref, tok_w, mode)


def _token_weights(sample: CalibSample, branch: str, ratio: dict[str, float] | None) -> torch.Tensor:
    if ratio is None:  # AWQ: uniform token weighting
        return torch.ones(sample.vision_mask.numel())
    w = sample.caption_mask.float().reshape(-1).clone()
    w[sample.vision_mask.reshape(-1)] = ratio[branch]
    return w


def search_subset(calls: Sequence[BlockCall], cap: int) -> list[tuple[int, list[int]]] | None:
    """Which (call, rows) the search loss is measured on: whole sequences spread evenly over the calls
    until ``cap`` tokens; None when every token fits (``cap`` <= 0 or not smaller than the total)."""
    seqs = [(j, r, int(c.hidden.shape[1])) for j, c in enumerate(calls) for r in range(int(c.hidden.shape[0]))]
    total = sum(n for _, _, n in seqs)
    if cap <= 0 or total <= cap:
        return None
    mean = total / len(seqs)
    want = max(1, min(len(seqs), int(round(cap / mean))))
    picked = sorted({int(i * len(seqs) / want) for i in range(want)})
    out: dict[int, list[int]] = {}
    for i in picked:
        j, r, _ = seqs[i]
        out.setdefault(j, []).append(r)
    return sorted(out.items())


def _rows(v: Any, batch: int, rows: list[int]) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == batch and batch > 1:
        return v[rows]
    if isinstance(v, tuple):
        return tuple(_rows(t, batch, rows) for t in v)
    return v


def _subset_calls(calls: Sequence[BlockCall], subset: list[tuple[int, list[int]]]) -> list[BlockCall]:
    out = []
    for j, rows in subset:
        c = calls[j]
        b = int(c.hidden.shape[0])
        if rows == list(range(b)):
            out.append(c)
        else:
            out.append(BlockCall(c.hidden[rows], {k: _rows(v, b, rows) for k, v in c.kwargs.items()}))
    return out


def _search_block(block: CalibrationBlock, samples: Sequence[CalibSample], cfg: MBQConfig,
                  ratio: dict[str, float] | None, loss_mode: str, scope: str, search_tokens: int
                  ) -> list[GroupResult]:
    groups = block_groups(block.roles, fold_down=not cfg.online_hadamard)
    module_scope = [g for g in groups if scope == "module" and g.name in ENCLOSING]
    linear_scope = [g for g in groups if g not in module_scope]
    roles = [ENCLOSING[g.name] for g in module_scope] + [g.input_role for g in linear_scope]
    calls = block.calls()
    subset = search_subset(calls, search_tokens)
    x_means: dict[str, torch.Tensor] = {}
    if subset is None:
        search_calls = calls
        weights = [{b: _token_weights(s, b, ratio) for b in ("attn", "mlp")} for s in samples]
    else:
        # statistics over every token, the loss on the subset
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def acc(role: str, x: torch.Tensor, _call: int) -> None:
            a = x.detach().reshape(-1, x.shape[-1]).float().abs().sum(dim=0)
            sums[role] = sums[role] + a if role in sums else a
            counts[role] = counts.get(role, 0) + x.numel() // x.shape[-1]

        float_outputs: list[torch.Tensor] = []
        block.record(roles, calls, on_input=acc, keep=lambda _j: False, outputs=float_outputs)
        x_means = {r: sums[r] / counts[r] for r in sums}
        # folding is function-preserving: the float block's outputs are the next block's inputs (up to
        # rounding), so the block is not run a third time (a method's set_outputs still overrides this)
        block.set_outputs(float_outputs)
        search_calls = _subset_calls(calls, subset)
        weights = []
        for j, rows in subset:
            shape = tuple(calls[j].hidden.shape[:2])
            weights.append({b: _token_weights(samples[j], b, ratio).reshape(shape)[rows].reshape(-1)
                            for b in ("attn", "mlp")})
    recs = block.record(roles, search_calls, keep_calls=True)
    results = []
    for g in groups:
        tok_w = torch.cat([w[g.branch] for w in weights]).to(block.device)
        if g in module_scope:
            role = ENCLOSING[g.name]
            s, rho, value, rtn = search_group_on_module(g, block.roles[role], recs[role], tok_w, cfg, loss_mode,
                                                        x_means.get(role))
        else:
            s, rho, value, rtn = search_group(recs[g.input_role].input_rows(), g, tok_w, cfg, loss_mode,
                                              x_means.get(g.input_role))
        fold_scales(g, s)
        results.append(GroupResult(block.index, g.name, rho, value, rtn))
    return results


# -------------------------------------------------------------------------------------- GPTQ
#: baselines whose codes GPTQ chooses ("awq-gptq" / "mbq-gptq": after AWQ's / MBQ's scales are folded)
GPTQ_BASELINES = ("gptq", "awq-gptq", "mbq-gptq")
#: buffers a GPTQ-quantized linear carries into the calibrated copy: its checkpoint tensors (qweight,
#: scales and, weight-only, zeros; :func:`overdrive.mbq.quant.group_tensors` / ``act8_tensors``), which
#: the checkpoint writer renames
GPTQ_BUFFERS = {"gptq_qweight": "qweight", "gptq_scales": "scales", "gptq_zeros": "zeros"}
#: role whose input a Hessian is accumulated on -> the linears reading that same input
GPTQ_INPUTS = {"q": ("q", "k", "v"), "o": ("o",), "gate": ("gate", "up"), "down": ("down",)}
_BRANCH = {"q": "attn", "o": "attn", "gate": "mlp", "down": "mlp"}


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's knobs: dampening ``percdamp`` (fraction of the mean Hessian diagonal), activation order
    (with static groups: the checkpoint layout stays the same), lazy-batch ``block_size``, and the dtype
    of the Hessians and of GPTQ's math (float64 by default: the result does not depend on summation
    order; float32 is faster on GPUs with slow float64)."""

    percdamp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if not 0 <= self.percdamp < 1:
            raise ConfigError(f"GPTQ dampening must be in [0, 1), got {self.percdamp}")
        if self.block_size <= 0:
            raise ConfigError(f"GPTQ block size must be positive, got {self.block_size}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"GPTQ dtype must be float32 or float64, got {self.dtype}")


def gptq_grid(cfg: MBQConfig) -> ChannelSymmetric | GroupAsymmetric:
    """MBQ's weight grid for ``cfg`` (the one its round to nearest uses)."""
    return ChannelSymmetric(cfg.bits) if cfg.act_bits == 8 else GroupAsymmetric(cfg.bits, cfg.group_size)


def _gptq_block(block: CalibrationBlock, samples: Sequence[CalibSample], cfg: MBQConfig,
                ratio: dict[str, float] | None, opts: GPTQOptions
                ) -> tuple[list[GroupResult], list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]]:
    """GPTQ every linear of ``block`` in place (weights -> dequantized GPTQ weights); returns per-linear
    results (loss: GPTQ's objective; rtn_loss: RTN's on the same Hessian) and the checkpoint tensors."""
    hess = {r: Hessian(block.roles[r].in_features, opts.dtype, block.device) for r in GPTQ_INPUTS}
    weights = [None if ratio is None else {b: _token_weights(s, b, ratio) for b in ("attn", "mlp")}
               for s in samples]

    def accumulate(role: str, x: torch.Tensor, call: int) -> None:
        w = weights[call]
        hess[role].add(x.detach(), None if w is None else w[_BRANCH[role]].to(x.device))

    block.record(tuple(GPTQ_INPUTS), on_input=accumulate, keep=lambda _j: False)
    grid = gptq_grid(cfg)
    results, tensors = [], []
    for role, members in GPTQ_INPUTS.items():
        h = hess.pop(role).get()
        for m in members:
            lin = block.roles[m]
            res = gptq(lin.weight, h, grid, block_size=opts.block_size, percdamp=opts.percdamp,
                       act_order=opts.act_order, dtype=opts.dtype)
            results.append(GroupResult(block.index, m, 0.0, res.error,
                                       objective(lin.weight, rtn(lin.weight, grid, opts.dtype).weight, h)))
            lin.weight.copy_(res.weight)
            t = (act8_tensors(res.codes.cpu(), res.scales.cpu(), cfg.bits) if cfg.act_bits == 8 else
                 group_tensors(res.codes.cpu(), res.scales.cpu(), res.zeros.cpu(), cfg.bits))
            tensors.append((lin, t))
    return results, tensors


@torch.no_grad()
def calibrate_blocks(run: LLMCalibration, samples: Sequence[CalibSample], cfg: MBQConfig, *,
                     ratios: list[dict[str, float]] | None, loss_mode: str = "mae", distort: bool = False,
                     scope: str = "module", search_tokens: int = SEARCH_TOKENS,
                     gptq_opts: GPTQOptions | None = None) -> list[GroupResult]:
    """Block by block (the layer onloads one decoder block at a time): search and fold the block's
    scales (every baseline but "gptq"), then, for the GPTQ baselines, GPTQ its linears. Only the current
    block's inputs, its recorded sub-module calls and its outputs are held (one block's activations over
    the calibration set). ``ratios``: MBQ's per-layer gradient ratios (the token weights of the search
    loss and of GPTQ's Hessians); None: uniform. ``scope``: "module" judges q,k,v and gate,up on the
    attention / MLP output (AWQ); "linear" on the group's own linear outputs. ``distort``: scale search
    on the quantized earlier blocks (GPTQ always propagates the quantized blocks' outputs).
    """
    if scope not in ("module", "linear"):
        raise ConfigError(f"search scope must be 'module' or 'linear', got {scope!r}")
    use_gptq = cfg.baseline in GPTQ_BASELINES
    opts = gptq_opts or GPTQOptions()
    results: list[GroupResult] = []
    quantized: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    for block in run.blocks([s.inputs for s in samples], propagate="calibrated",
                            desc=f"mbq ({cfg.baseline})"):
        ratio = ratios[block.index] if ratios else None
        if cfg.baseline != "gptq":
            results += _search_block(block, samples, cfg, ratio, loss_mode, scope, search_tokens)
        if use_gptq:
            res, tensors = _gptq_block(block, samples, cfg, ratio, opts)
            results += res
            quantized += tensors
            block.set_outputs(block.run())  # the next block sees the quantized block
        elif distort:
            linears = [block.roles[r] for r in ("q", "k", "v", "o", "gate", "up", "down")]
            saved = [lin.weight.detach().clone() for lin in linears]
            for lin in linears:
                lin.weight.copy_(fake_quant_weight(lin.weight, cfg))
            block.set_outputs(block.run())
            for lin, w in zip(linears, saved):
                lin.weight.copy_(w)
    # after the loop: the blocks are back in storage, where a buffer keeps its dtype (float16 scales)
    for lin, tensors in quantized:
        for buf, name in GPTQ_BUFFERS.items():
            if name in tensors:
                lin.register_buffer(buf, tensors[name])
    return results


def calibrate(run: LLMCalibration, samples: Sequence[CalibSample], cfg: MBQConfig, *,
              loss_mode: str = "mae", distort: bool = False, scope: str = "module",
              search_tokens: int = SEARCH_TOKENS, gptq_opts: GPTQOptions | None = None) -> list[GroupResult]:
    """Calibrate the model in place per ``cfg.baseline``: "mbq" / "awq" search and fold scales; "gptq"
    quantizes with GPTQ (uniform token weights); "awq-gptq" / "mbq-gptq" fold AWQ's / MBQ's scales, then
    run GPTQ (MBQ's modality token weights in the Hessians for "mbq-gptq"). Returns per-group results."""
    if cfg.baseline == "rtn":
        return []
    if loss_mode not in ("mae", "mse"):
        raise ConfigError(f"loss mode must be 'mae' or 'mse', got {loss_mode!r}")
    if not samples:
        raise ConfigError("no calibration samples")
    ratios = None
    if cfg.baseline in ("mbq", "mbq-gptq"):
        if not any(bool(s.vision_mask.any()) for s in samples):
            as_ = "AWQ" if cfg.baseline == "mbq" else "AWQ+GPTQ"
            warnings.warn(f"MBQ calibration data has no vision tokens: running as {as_} (uniform token weights)",
                          stacklevel=2)
        else:
            ratios = gradient_ratios(run, samples)
    return calibrate_blocks(run, samples, cfg, ratios=ratios, loss_mode=loss_mode, distort=distort, scope=scope,
                            search_tokens=search_tokens, gptq_opts=gptq_opts)


def iter_finite(results: Iterable[GroupResult]) -> bool:
    return all(math.isfinite(r.loss) for r in results)

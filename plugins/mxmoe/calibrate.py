"""MxMoE's calibration: per-(layer, expert, linear, format) sensitivity, expert frequencies and the time
model on the LLM calibration layer, then the per-layer allocation.

Each decoder block runs once on the float model's inputs (``propagate="original"``: every block is
measured on the activations the unquantized model gives it). For a sparse MoE block, the MoE input
``x`` (after the block's norm) is recorded and routed by the model's own router. Quantizing one linear of
expert ``e`` changes the block's output only through that expert's term of the routed sum, so the
decoder-block output error when only that linear is quantized in format ``c`` is, exactly,

    loss[e, linear, c] = sum over tokens t routed to e of  w[t, e]^2 * |f_e^c(x_t) - f_e(x_t)|^2

(``f_e``: the float expert, ``f_e^c``: with that one linear quantized, W-A formats also quantizing
that linear's input activations; ``w``: the routing weight). GPTQ's Hessian of each linear is weighted
the same way (``w^2``), so GPTQ minimises this very error. The number of (token, slot) pairs each
expert receives is its frequency; the time model prices each linear at the expert's share of a
serving batch of ``batch_tokens`` tokens (:class:`overdrive.mxmoe.costs.CostTable`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch

from overdrive.config import ConfigError
from overdrive.contracts.llm_calibration import LLMCalibration, moe_view
from overdrive.mbq.gptq import Hessian

from .allocate import Allocation, allocate, pareto
from .config import LINEARS, Format, linear_shape, parse_format
from .costs import CostTable
from .quant import quantize_act, quantize_weight


@dataclasses.dataclass
class LayerResult:
    layer: int
    frequency: list[int]                    # (token, slot) pairs per expert
    loss: np.ndarray                        # (E * 3, C): block (e, linear) = e * 3 + LINEARS.index(linear)
    time: np.ndarray                        # (E * 3, C)
    choice: Allocation
    front: list[Allocation]
    tensors: dict[tuple[int, str], dict[str, torch.Tensor]]  # the chosen formats' checkpoint tensors
    candidates: list[str] = dataclasses.field(default_factory=list)
    bits: np.ndarray | None = None          # (E * 3, C) storage bits per weight (1e9: format does not fit)
    numel: np.ndarray | None = None         # (E * 3,) weights per block
    #: every candidate's checkpoint tensors, (expert, linear, candidate index) -> tensors (``keep_all``)
    all_tensors: dict[tuple[int, str, int], dict[str, torch.Tensor]] | None = None


def _expert_out(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, act: Any,
                fmts: dict[str, Format | None]) -> torch.Tensor:
    def lin(v: torch.Tensor, w: torch.Tensor, f: Format | None) -> torch.Tensor:
        if f is not None and not f.weight_only:
            v = quantize_act(v, f.act_bits)
        return v @ w.T

    return lin(act(lin(x, wg, fmts.get("gate"))) * lin(x, wu, fmts.get("up")), wd, fmts.get("down"))


def calibrate_layer(view: Any, x: torch.Tensor, layer: int, candidates: Sequence[str], quantizer: str,
                    avg_bits: float, r: float, costs: CostTable, batch_tokens: int,
                    rs: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0), keep_all: bool = False) -> LayerResult:
    """Sensitivity, frequency and allocation of one MoE layer from its recorded MoE inputs ``x`` (T, H)."""
    fmts = [parse_format(c, "--candidates") for c in candidates]
    h, i = view.hidden, view.intermediate
    fits = {lin: [not f.group_size or linear_shape(lin, h, i)[1] % f.group_size == 0 for f in fmts]
            for lin in LINEARS}
    for lin, ok in fits.items():
        if not any(ok):
            raise ConfigError(f"--candidates: no format fits the expert {lin} linears of layer {layer} "
                              f"({linear_shape(lin, h, i)[1]} input features)")
    x = x.reshape(-1, h).to(torch.float32)
    with torch.no_grad():
        w, idx = view.route(x.to(view.weight(0, "gate").dtype))
    w = w.to(torch.float32)
    E, C, T = view.num_experts, len(fmts), x.shape[0]
    loss = np.zeros((E * 3, C))
    tim = np.zeros((E * 3, C))
    bits = np.zeros((E * 3, C))
    numel = np.zeros(E * 3)
    freq = []
    cand: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}
    for e in range(E):
        tok, slot = torch.where(idx == e)
        freq.append(int(tok.numel()))
        xe = x[tok]
        we2 = (w[tok, slot] ** 2).to(torch.float32)
        W = {lin: view.weight(e, lin).detach().to(torch.float32) for lin in LINEARS}
        with torch.no_grad():
            y = _expert_out(xe, W["gate"], W["up"], W["down"], view.act_fn, {})
            mid = view.act_fn(xe @ W["gate"].T) * (xe @ W["up"].T)
        hess = {}
        if quantizer == "gptq" and tok.numel():
            hx, hm = Hessian(h, device=x.device), Hessian(i, device=x.device)
            hx.add(xe, we2)
            hm.add(mid, we2)
            hess = {"gate": hx.get(), "up": hx.get(), "down": hm.get()}
        share = tok.numel() / max(T, 1) * batch_tokens
        for li, lin in enumerate(LINEARS):
            b = e * 3 + li
            n, k = linear_shape(lin, h, i)
            numel[b] = n * k
            for ci, f in enumerate(fmts):
                if not fits[lin][ci]:  # the group does not divide K: never chosen (no budget fits it)
                    bits[b, ci] = 1e9
                    continue
                q = "gptq" if lin in hess else "rtn"
                t, wq = quantize_weight(W[lin], f, q, hess.get(lin))
                cand[(e, lin, ci)] = t
                bits[b, ci] = f.bits_per_weight(k)
                tim[b, ci] = costs.seconds(f, n, k, share)
                if tok.numel():
                    Wq = dict(W)
                    Wq[lin] = wq.to(torch.float32)
                    with torch.no_grad():
                        yq = _expert_out(xe, Wq["gate"], Wq["up"], Wq["down"], view.act_fn, {lin: f})
                    loss[b, ci] = float((we2[:, None].double() * (yq - y).double() ** 2).sum())
                else:  # never routed in calibration: rank formats by weight error only, at a tiny scale
                    loss[b, ci] = 1e-12 * float(((wq - W[lin]).double() ** 2).sum())
    for lin in LINEARS:  # infeasible formats: loss and time of the worst feasible one (never chosen anyway)
        bad = ~np.array(fits[lin])
        if bad.any():
            rows = [e * 3 + LINEARS.index(lin) for e in range(E)]
            for b in rows:
                loss[b, bad] = loss[b, ~bad].max()
                tim[b, bad] = tim[b, ~bad].max()
    # a block whose every format is lossless (e.g. all-zero weights) still needs positive losses
    loss = np.maximum(loss, 1e-30)
    front = pareto(loss, tim, bits, numel, avg_bits, rs)
    choice = allocate(loss, tim, bits, numel, avg_bits, r)
    tensors = {(b // 3, LINEARS[b % 3]): cand[(b // 3, LINEARS[b % 3], c)] for b, c in enumerate(choice.choice)}
    return LayerResult(layer, freq, loss, tim, choice, front, tensors, list(candidates), bits, numel,
                       cand if keep_all else None)


def calibrate(run: LLMCalibration, batches: Sequence[dict[str, torch.Tensor]], candidates: Sequence[str],
              quantizer: str, avg_bits: float, r: float, costs: CostTable, batch_tokens: int = 256,
              progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[LayerResult]]:
    """Every MoE layer's allocation; returns (the model identity as a dict, the per-layer results)."""
    results: list[LayerResult] = []
    ident: dict[str, Any] = {}
    for block in run.blocks(batches, propagate="original", desc="mxmoe sensitivity"):
        view = moe_view(block.module, run.config)
        if view is None:
            continue
        if not ident:
            ident = {"num_experts": view.num_experts, "top_k": view.top_k, "hidden_size": view.hidden,
                     "expert_intermediate_size": view.intermediate, "renormalize": view.renormalize,
                     "shared_expert": view.shared_expert}
        rec = block.record(["mlp"])["mlp"]
        res = calibrate_layer(view, rec.input_rows(), block.index, candidates, quantizer, avg_bits, r, costs,
                              batch_tokens)
        results.append(res)
        if progress:
            progress(f"mxmoe layer {block.index}: {res.choice.avg_bits:.3f} bits, loss {res.choice.loss:.3g}, "
                     f"{len(res.front)} Pareto points")
    if not results:
        raise ConfigError("mxmoe: the model has no sparse MoE layers (expected Mixtral / Qwen2-MoE / Qwen3-MoE "
                          "style blocks with a router and fused experts)")
    geo = run.geometry
    ident.update(architecture=geo.architecture, num_layers=geo.num_layers, moe_layers=[r_.layer for r_ in results])
    costs.save()
    return ident, results

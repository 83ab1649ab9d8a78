"""MBQ calibration: modality-weighted, gradient-reweighted AWQ-style scale search (and AWQ, RTN).

Pipeline (``calibrate(model, samples, cfg)``), on a transformers (vision-)language model:

1. **Modality masks** per sample: vision tokens (image/video placeholders) and caption tokens (the
   assistant's answer); other prompt tokens get weight 0 in MBQ's loss.
2. **Gradient reweighting** (MBQ only): one backward pass of the loss on caption tokens; for each
   decoder layer, r = mean|dL/d out| over vision tokens / the same over caption tokens, at the
   attention output projection and at the MLP down projection; r is clamped from below by its median
   over layers.
3. **Scale search** (W4A8/W8A8: weights per-channel symmetric and activations per-token int8, both
   quantized inside the loop), block by block, for the groups (input norm -> q,k,v), (v -> o, when shapes allow),
   (post-attention norm -> gate, up), (up -> down): s = mean|x|^rho over the group's input channels,
   rho in {0, 0.05, ..., 0.95}, normalised by sqrt(max * min); the loss is the token-weighted mean
   absolute (or squared) error of the group's outputs with weights quantized as Q(W * s) / s. Token
   weights: MBQ caption 1, vision r, others 0; AWQ every token 1. rho = 0 is plain RTN, so the chosen
   scales never do worse than RTN on the calibration data. The best s is folded into the preceding
   norm or linear (the float model's function is unchanged by folding).
4. ``distort``: each block is calibrated on the outputs of the already-quantized earlier blocks
   (their weights quantized; for W4A8/W8A8 their activations are not).

The loss of q,k,v is measured on the attention block's output and that of gate,up on the MLP's
output (the enclosing module, as AWQ does); v->o and up->down on their own linear outputs
(``scope="linear"`` judges every group on its own linear outputs); see docs/methods/mbq.md.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.progress import progress

from .config import MBQConfig

GRID = [i / 20 for i in range(20)]  # rho in {0, 0.05, ..., 0.95}


@dataclasses.dataclass
class CalibSample:
    """One calibration sample: model inputs and its modality masks (1-D bool over tokens)."""

    inputs: dict[str, torch.Tensor]
    vision_mask: torch.Tensor
    caption_mask: torch.Tensor


@dataclasses.dataclass
class GroupResult:
    layer: int
    group: str
    rho: float
    loss: float
    rtn_loss: float


# ------------------------------------------------------------------------------ quantization
def rtn_fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest group-asymmetric quantize-dequantize of a (N, K) weight (float32 math)."""
    from .quantize import rtn_codes

    codes, scales, zeros = rtn_codes(w, bits, group_size)
    n, k = w.shape
    return ((codes - zeros[..., None]) * scales[..., None]).reshape(n, k).to(w.dtype)


def fake_quant_weight(w: torch.Tensor, cfg: MBQConfig) -> torch.Tensor:
    """Quantize-dequantize a weight with the scheme's weight format."""
    if cfg.act_bits == 8:
        from .quantize import rtn_per_channel_symmetric

        codes, scales = rtn_per_channel_symmetric(w, cfg.bits)
        return (codes * scales[:, None]).to(w.dtype)
    return rtn_fake_quant(w, cfg.bits, cfg.group_size)


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 quantize-dequantize (W4A8/W8A8 activations)."""
    from overdrive.kernels.act8_linear import quantize_per_token

    xq, sx = quantize_per_token(x.reshape(-1, x.shape[-1]))
    return (xq * sx[:, None]).to(x.dtype).reshape(x.shape)


# ---------------------------------------------------------------------------- model structure
def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language decoder's layer list (skips vision towers)."""
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList) and len(mod) \
                and hasattr(mod[0], "self_attn") and hasattr(mod[0], "mlp") and "visual" not in name:
            return mod
    raise ConfigError(f"{type(model).__name__}: no decoder layer list with self_attn and mlp found; MBQ "
                      "calibration supports Llama/Qwen2-style decoders")


@dataclasses.dataclass
class Group:
    name: str
    prev: torch.nn.Module  # norm (has .weight) or linear whose output channels feed the group
    linears: list[torch.nn.Linear]
    branch: str  # "attn" or "mlp": which reweighting ratio applies


def layer_groups(layer: torch.nn.Module, fold_down: bool | None = None) -> list[Group]:
    """The layer's scale groups. (up -> down) is left out when ``fold_down`` is False, by default when
    an online Hadamard rotation sits between them (:mod:`.rotation`): a scale on down_proj's rotated
    inputs cannot be folded into up_proj."""
    a, m = layer.self_attn, layer.mlp
    if fold_down is None:
        fold_down = not getattr(m.down_proj, "overdrive_online_hadamard", 0)
    groups = [Group("qkv", layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], "attn")]
    if a.v_proj.out_features == a.o_proj.in_features:  # with grouped KV heads the shapes do not allow it
        groups.append(Group("o", a.v_proj, [a.o_proj], "attn"))
    groups.append(Group("gate_up", layer.post_attention_layernorm, [m.gate_proj, m.up_proj], "mlp"))
    if fold_down:
        groups.append(Group("down", m.up_proj, [m.down_proj], "mlp"))
    return groups


def block_linears(layer: torch.nn.Module) -> list[tuple[str, str, torch.nn.Linear]]:
    """Every quantized linear of a decoder block: (branch, name, module)."""
    a, m = layer.self_attn, layer.mlp
    return [("attn", n, getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [("mlp", n, getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")]


@torch.no_grad()
def fold_scales(group: Group, s: torch.Tensor) -> None:
    """W_linear[:, c] *= s[c]; prev output channel c /= s[c]. Function-preserving in float."""
    s = s.to(torch.float32)
    prev = group.prev
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for lin in group.linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


# -------------------------------------------------------------------------- reweighting (MBQ)
def gradient_ratios(model: torch.nn.Module, samples: Sequence[CalibSample]) -> list[dict[str, float]]:
    """Per decoder layer {"attn": r, "mlp": r}: mean |dL/dout| over vision / over caption tokens."""
    layers = decoder_layers(model)
    sums = [{(b, k): 0.0 for b in ("attn", "mlp") for k in ("vis", "cap")} for _ in layers]
    counts = {"vis": 0, "cap": 0}
    masks: dict[str, torch.Tensor] = {}

    def hook_for(i: int, branch: str):
        def fwd(_mod, _inp, out):
            def grad_hook(g: torch.Tensor) -> None:
                a = g.detach().abs().float().mean(dim=-1).reshape(-1)  # per token
                sums[i][(branch, "vis")] += float(a[masks["vis"]].sum())
                sums[i][(branch, "cap")] += float(a[masks["cap"]].sum())
            out.register_hook(grad_hook)
        return fwd

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook_for(i, "attn")))
        handles.append(layer.mlp.down_proj.register_forward_hook(hook_for(i, "mlp")))
    was_training = model.training
    model.eval()
    try:
        for smp in samples:
            masks["vis"], masks["cap"] = smp.vision_mask.reshape(-1), smp.caption_mask.reshape(-1)
            counts["vis"] += int(masks["vis"].sum())
            counts["cap"] += int(masks["cap"].sum())
            model.zero_grad(set_to_none=True)
            ids = smp.inputs["input_ids"]
            labels = torch.where(smp.caption_mask.reshape(ids.shape), ids, torch.full_like(ids, -100))
            out = model(**smp.inputs, labels=labels, use_cache=False)
            if not torch.isfinite(out.loss):
                raise ConfigError(f"calibration loss is {out.loss.item()} on a sample; check the model and data")
            out.loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if counts["vis"] == 0 or counts["cap"] == 0:
        return [{"attn": 1.0, "mlp": 1.0} for _ in layers]
    ratios = [{b: (s[(b, "vis")] / counts["vis"]) / max(s[(b, "cap")] / counts["cap"], 1e-30)
               for b in ("attn", "mlp")} for s in sums]
    for b in ("attn", "mlp"):
        med = float(torch.tensor([r[b] for r in ratios]).median())
        for r in ratios:
            r[b] = max(r[b], med)
    return ratios


# --------------------------------------------------------------------------------- the search
def _loss(out: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, mode: str) -> float:
    d = (out - ref).abs() if mode == "mae" else (out - ref) ** 2
    return float((d.mean(dim=-1) * w).sum() / w.sum().clamp_min(1e-12))


def _grid_scales(x_mean: torch.Tensor) -> Iterable[tuple[float, torch.Tensor]]:
    for rho in GRID:
        s = x_mean.pow(rho)
        yield rho, s / (s.max() * s.min()).sqrt()


def _search(x_mean: torch.Tensor, evaluate: Callable[[torch.Tensor], torch.Tensor], ref: torch.Tensor,
            tok_w: torch.Tensor, mode: str) -> tuple[torch.Tensor, float, float, float]:
    """Grid search over rho: (best s, rho, its loss, the loss at rho = 0, i.e. RTN)."""
    best: tuple[torch.Tensor | None, float, float] = (None, 0.0, math.inf)
    rtn_loss = math.inf
    for rho, s in _grid_scales(x_mean):
        loss = _loss(evaluate(s), ref, tok_w, mode)
        if rho == 0.0:
            rtn_loss = loss
        if loss < best[2]:
            best = (s, rho, loss)
    assert best[0] is not None, "every grid point gave a NaN loss"
    return best[0], best[1], best[2], rtn_loss


@torch.no_grad()
def search_group(x: torch.Tensor, group: Group, tok_w: torch.Tensor, cfg: MBQConfig, mode: str,
                 ) -> tuple[torch.Tensor, float, float, float]:
    """Best scales for one group judged on the group's own linear outputs: (s, rho, loss, RTN loss)."""
    x = x.to(torch.float32)
    ref = torch.cat([torch.nn.functional.linear(x, l.weight.float(), None) for l in group.linears], dim=-1)

    def evaluate(s: torch.Tensor) -> torch.Tensor:
        xs = x / s[None, :]
        if cfg.act_bits == 8:
            xs = fake_quant_act(xs)
        return torch.cat([torch.nn.functional.linear(xs, fake_quant_weight(l.weight.float() * s[None, :], cfg), None)
                          for l in group.linears], dim=-1)

    return _search(x.abs().mean(dim=0).clamp_min(1e-6), evaluate, ref, tok_w, mode)


@dataclasses.dataclass
class _Calls:
    """Recorded calls of one module over the calibration batches: (args, kwargs) and outputs."""

    calls: list[tuple[tuple, dict]] = dataclasses.field(default_factory=list)
    outs: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def input_rows(self) -> torch.Tensor:
        """The first input (hidden states) of every call, as (tokens, features) rows."""
        rows = []
        for args, kwargs in self.calls:
            h = args[0] if args else kwargs["hidden_states"]
            rows.append(h.reshape(-1, h.shape[-1]))
        return torch.cat(rows)

    def ref(self) -> torch.Tensor:
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in self.outs])


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _record(module: torch.nn.Module, rec: _Calls) -> list[Any]:
    def pre(_m, args, kwargs):
        rec.calls.append((args, dict(kwargs)))

    def post(_m, _args, _kwargs, out):
        rec.outs.append(_first(out).detach())

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True)]


@torch.no_grad()
def search_group_on_module(group: Group, module: torch.nn.Module, rec: _Calls, tok_w: torch.Tensor,
                           cfg: MBQConfig, mode: str) -> tuple[torch.Tensor, float, float, float]:
    """Best scales for one group judged on the output of its enclosing ``module`` (as AWQ does: q,k,v
    on the attention block's output, gate,up on the MLP's output), from the recorded calls.

    For a candidate s the group's weights become Q(W s) / s (and, with int8 activations, each
    linear's input x becomes Qa(x / s) s), so the module computes Qa(x / s) Q(W s)^T exactly as the
    folded, quantized model will; every other weight of the module stays float.
    """
    x_mean = rec.input_rows().float().abs().mean(dim=0).clamp_min(1e-6)
    ref = rec.ref().float()
    saved = [l.weight.detach().clone() for l in group.linears]

    def evaluate(s: torch.Tensor) -> torch.Tensor:
        hooks = []
        for l, w0 in zip(group.linears, saved):
            sw = s.to(w0.dtype)
            l.weight.copy_(fake_quant_weight(w0 * sw[None, :], cfg) / sw[None, :])
            if cfg.act_bits == 8:
                hooks.append(l.register_forward_pre_hook(
                    lambda _m, args, s=s: (fake_quant_act(args[0] / s.to(args[0].dtype)) * s.to(args[0].dtype),
                                           *args[1:])))
        try:
            return torch.cat([_first(module(*a, **k)).reshape(-1, ref.shape[-1]).float() for a, k in rec.calls])
        finally:
            for h in hooks:
                h.remove()
            for l, w0 in zip(group.linears, saved):
                l.weight.copy_(w0)

    return _search(x_mean, evaluate, ref, tok_w, mode)


def _capture_layer0_inputs(model: torch.nn.Module, samples: Sequence[CalibSample]) -> list[tuple[tuple, dict]]:
    layers = decoder_layers(model)
    captured: list[tuple[tuple, dict]] = []

    class _Stop(Exception):
        pass

    def pre(_mod, args, kwargs):
        kw = dict(kwargs)
        # the block is re-run many times during the search: it must not append to a KV cache
        for k in ("past_key_values", "past_key_value"):
            if k in kw:
                kw[k] = None
        kw["use_cache"] = False
        captured.append((args, kw))
        raise _Stop

    h = layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for smp in samples:
                try:
                    model(**smp.inputs, use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    return captured


def _layer_out(layer: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return _first(layer(*args, **kwargs))


def _to_float32(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.float() if v.is_floating_point() else v
    if isinstance(v, tuple):
        return tuple(_to_float32(t) for t in v)
    return v


#: which enclosing module judges a group's scales ("attn": the attention block; "mlp": the MLP);
#: groups not listed are judged on their own linear outputs (as AWQ does for v->o and up->down)
ENCLOSING = {"qkv": "attn", "gate_up": "mlp"}


@torch.no_grad()
def search_and_fold(model: torch.nn.Module, samples: Sequence[CalibSample], cfg: MBQConfig, *,
                    ratios: list[dict[str, float]] | None, loss_mode: str = "mae", distort: bool = False,
                    scope: str = "module") -> list[GroupResult]:
    """Run the block-wise scale search and fold the chosen scales into ``model`` in place.

    Block by block: only the current decoder block's inputs, its recorded sub-module calls and its
    outputs are held in memory (one block's activations over the calibration set). A model held in
    16 bits is searched with the current block in float32 and cast back after folding.
    ``scope``: "module" judges q,k,v and gate,up on the attention / MLP output (AWQ); "linear" on the
    group's own linear outputs.
    """
    if scope not in ("module", "linear"):
        raise ConfigError(f"search scope must be 'module' or 'linear', got {scope!r}")
    layers = decoder_layers(model)
    inputs = [(_to_float32(a), {k: _to_float32(v) for k, v in kw.items()})
              for a, kw in _capture_layer0_inputs(model, samples)]
    results: list[GroupResult] = []
    for i, layer in enumerate(progress(layers, desc=f"mbq search ({cfg.baseline})", total=len(layers), unit="block")):
        dtype = next(layer.parameters()).dtype
        layer.float()
        groups = layer_groups(layer)
        recs = {"attn": _Calls(), "mlp": _Calls()}
        feats: dict[str, list[torch.Tensor]] = {}

        def grab(name: str):
            def hook(_m, inp, _out):
                feats.setdefault(name, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
            return hook

        hs = [g.linears[0].register_forward_hook(grab(g.name)) for g in groups
              if scope == "linear" or g.name not in ENCLOSING]
        if scope == "module":
            hs += _record(layer.self_attn, recs["attn"]) + _record(layer.mlp, recs["mlp"])
        try:
            for j, (args, kwargs) in enumerate(inputs):
                out = _layer_out(layer, args, kwargs)
                if not torch.isfinite(out).all():
                    raise ConfigError(f"NaN/inf activations at decoder layer {i} (block output) on calibration sample {j}; "
                                      "nothing was written")
        finally:
            for h in hs:
                h.remove()
        for g in groups:
            tok_w = _token_weights(samples, g.branch, ratios[i] if ratios else None)
            if scope == "module" and g.name in ENCLOSING:
                module = layer.self_attn if ENCLOSING[g.name] == "attn" else layer.mlp
                s, rho, loss, rtn_loss = search_group_on_module(g, module, recs[ENCLOSING[g.name]], tok_w, cfg,
                                                                loss_mode)
            else:
                s, rho, loss, rtn_loss = search_group(torch.cat(feats.pop(g.name)), g, tok_w, cfg, loss_mode)
            fold_scales(g, s)
            results.append(GroupResult(i, g.name, rho, loss, rtn_loss))
        del recs, feats
        if distort:
            saved = {n: p.detach().clone() for n, p in layer.named_parameters()}
            _fake_quantize_layer(layer, cfg)
            inputs = [((_layer_out(layer, a, k), *a[1:]), k) for a, k in inputs]
            for n, p in layer.named_parameters():
                p.copy_(saved[n])
        else:
            inputs = [((_layer_out(layer, a, k), *a[1:]), k) for a, k in inputs]
        layer.to(dtype)
    return results


def _fake_quantize_layer(layer: torch.nn.Module, cfg: MBQConfig) -> None:
    for _, _, l in block_linears(layer):  # every linear (o_proj too, which has no scale group under GQA)
        l.weight.copy_(fake_quant_weight(l.weight, cfg))


def _token_weights(samples: Sequence[CalibSample], branch: str, ratio: dict[str, float] | None) -> torch.Tensor:
    ws = []
    for smp in samples:
        if ratio is None:  # AWQ: uniform token weighting
            ws.append(torch.ones(smp.vision_mask.numel()))
        else:
            w = smp.caption_mask.float().reshape(-1).clone()
            w[smp.vision_mask.reshape(-1)] = ratio[branch]
            ws.append(w)
    return torch.cat(ws)


# -------------------------------------------------------------------------------------- GPTQ
#: buffers a GPTQ-quantized linear carries into the calibrated copy (the checkpoint writer packs them
#: into MBQ's tensors and drops them): codes, scales, zero points of :mod:`.gptq`
GPTQ_BUFFERS = ("gptq_codes", "gptq_scales", "gptq_zeros")


@dataclasses.dataclass
class GPTQOptions:
    """GPTQ's knobs: dampening (fraction of the mean Hessian diagonal), activation order (static
    groups), lazy-batch block size, and the Hessian's accumulation dtype."""

    percdamp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    hessian_dtype: torch.dtype = torch.float32


def gptq_grid(cfg: MBQConfig):
    from .gptq import ChannelSymmetric, GroupAsymmetric

    return ChannelSymmetric(cfg.bits) if cfg.act_bits == 8 else GroupAsymmetric(cfg.bits, cfg.group_size)


@torch.no_grad()
def gptq_blocks(model: torch.nn.Module, samples: Sequence[CalibSample], cfg: MBQConfig, *,
                ratios: list[dict[str, float]] | None, opts: GPTQOptions | None = None) -> list[GroupResult]:
    """GPTQ every quantized linear of the decoder, block by block, in place.

    Each block runs on its inputs (the outputs of the already-quantized earlier blocks) while hooks
    accumulate every linear's Hessian ``2 X^T diag(w) X`` (``w``: MBQ's modality token weights when
    ``ratios`` is given, else 1); then the block's weights are quantized (:func:`overdrive.mbq.gptq.gptq`)
    and replaced by their dequantized values before the next block's inputs are computed. Each linear
    keeps its codes, scales and zero points as buffers (:data:`GPTQ_BUFFERS`) for the checkpoint writer.
    """
    from .gptq import Hessian, gptq, objective, rtn

    opts = opts or GPTQOptions()
    grid = gptq_grid(cfg)
    layers = decoder_layers(model)
    inputs = [(_to_float32(a), {k: _to_float32(v) for k, v in kw.items()})
              for a, kw in _capture_layer0_inputs(model, samples)]
    results: list[GroupResult] = []
    for i, layer in enumerate(progress(layers, desc=f"gptq ({cfg.baseline})", total=len(layers), unit="block")):
        dtype = next(layer.parameters()).dtype
        layer.float()
        linears = block_linears(layer)
        weights = [_sample_token_weights(smp, b, ratios[i] if ratios else None)
                   for b in ("attn", "mlp") for smp in samples]
        per_branch = {"attn": weights[:len(samples)], "mlp": weights[len(samples):]}
        hess = {id(lin): Hessian(lin.in_features, opts.hessian_dtype) for _, _, lin in linears}
        current = [0]

        def hook_for(lin: torch.nn.Linear, branch: str):
            def pre(_m, args):
                hess[id(lin)].add(args[0].detach(), per_branch[branch][current[0]])
            return pre

        hs = [lin.register_forward_pre_hook(hook_for(lin, b)) for b, _, lin in linears]
        try:
            for j, (args, kwargs) in enumerate(inputs):
                current[0] = j
                out = _layer_out(layer, args, kwargs)
                if not torch.isfinite(out).all():
                    raise ConfigError(f"NaN/inf activations at decoder layer {i} (block output) on calibration "
                                      f"sample {j}; nothing was written")
        finally:
            for h in hs:
                h.remove()
        quantized = []
        for _, name, lin in linears:
            h = hess.pop(id(lin)).get()
            res = gptq(lin.weight, h, grid, block_size=opts.block_size, percdamp=opts.percdamp,
                       act_order=opts.act_order)
            # GroupResult.loss / rtn_loss: GPTQ's objective tr((W-Q) H (W-Q)^T) and RTN's on the same H
            results.append(GroupResult(i, name, 0.0, res.error, objective(lin.weight, rtn(lin.weight, grid).weight, h)))
            lin.weight.copy_(res.weight)
            quantized.append((lin, res))
        inputs = [((_layer_out(layer, a, k), *a[1:]), k) for a, k in inputs]
        layer.to(dtype)
        for lin, res in quantized:  # after the cast: the buffers keep their exact dtypes
            codes = res.codes.to(torch.int8 if cfg.act_bits == 8 else torch.uint8)
            for n, t in zip(GPTQ_BUFFERS, (codes, res.scales.to(torch.float16), res.zeros.to(torch.uint8))):
                lin.register_buffer(n, t)
    return results


def _sample_token_weights(smp: CalibSample, branch: str, ratio: dict[str, float] | None) -> torch.Tensor | None:
    """One sample's token weights (None: uniform) as in :func:`_token_weights`."""
    if ratio is None:
        return None
    return _token_weights([smp], branch, ratio)


GPTQ_BASELINES = ("gptq", "awq-gptq", "mbq-gptq")


def calibrate(model: torch.nn.Module, samples: Sequence[CalibSample], cfg: MBQConfig, *,
              loss_mode: str = "mae", distort: bool = False, scope: str = "module",
              gptq_opts: GPTQOptions | None = None) -> list[GroupResult]:
    """Calibrate ``model`` in place per ``cfg.baseline``: "mbq" / "awq" search and fold scales;
    "gptq" quantizes with GPTQ (uniform token weights); "awq-gptq" / "mbq-gptq" fold AWQ's / MBQ's
    scales, then run GPTQ (MBQ's modality token weights in the Hessian for "mbq-gptq"). Returns
    per-group results."""
    if cfg.baseline == "rtn":
        return []
    if loss_mode not in ("mae", "mse"):
        raise ConfigError(f"loss mode must be 'mae' or 'mse', got {loss_mode!r}")
    if not samples:
        raise ConfigError("no calibration samples")
    ratios = None
    if cfg.baseline in ("mbq", "mbq-gptq"):
        if not any(bool(s.vision_mask.any()) for s in samples):
            warnings.warn("MBQ calibration data has no vision tokens: running as "
                          f"{'AWQ' if cfg.baseline == 'mbq' else 'AWQ+GPTQ'} (uniform token weights)", stacklevel=2)
        else:
            ratios = gradient_ratios(model, samples)
    results = []
    if cfg.baseline != "gptq":
        results = search_and_fold(model, samples, cfg, ratios=ratios, loss_mode=loss_mode, distort=distort,
                                  scope=scope)
    if cfg.baseline in GPTQ_BASELINES:
        results += gptq_blocks(model, samples, cfg, ratios=ratios, opts=gptq_opts)
    return results


def iter_finite(results: Iterable[GroupResult]) -> bool:
    return all(math.isfinite(r.loss) for r in results)

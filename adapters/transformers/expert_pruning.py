"""Expert pruning in transformers: the module swap that applies a plan's maps, and the calibration session.

transformers 5.x MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE) share one pattern: ``block.gate`` is a
top-k router module returning ``(router_logits, weights, indices)`` and ``block.experts`` holds fused
``gate_up_proj (E, 2I, H)`` / ``down_proj (E, H, I)`` parameters and loops over ``num_experts``.
Applying maps swaps ``block.gate`` for :class:`MappedRouter` (original gate weights, the route map,
top-k, the model's renormalisation) and the experts' parameters for the merged ``B`` experts; removing
them restores the original objects exactly. Nothing on any class is changed.

``overdrive calibrate --method NAME`` for every expert-pruning method runs :func:`calibrate_command`:
it loads the model, builds a :class:`TransformersExpertSession` (task scoring and routing statistics)
and hands it to the method's framework-neutral search.
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.expert_pruning import (ExpertPruningMethod, ExpertStats, LayerMaps, MoEIdentity, TaskRecord,
                                                mapped_routing, merge_experts)
from overdrive.kinds import Kind


class MappedRouter(torch.nn.Module):
    """Drop-in for a transformers top-k router: routes over the original ``E`` experts, then maps."""

    def __init__(self, weight: torch.Tensor, route: torch.Tensor, top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.weight = weight  # the original gate's parameter (shared, not copied)
        self.register_buffer("route", route.to(torch.float64), persistent=False)
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = hidden_states.reshape(-1, self.weight.shape[1])
        logits = torch.nn.functional.linear(h, self.weight)
        route = self.route.to(torch.promote_types(logits.dtype, torch.float32))
        scores, weights, idx = mapped_routing(logits, route, self.top_k, self.renormalize)
        return scores.log().to(logits.dtype), weights.to(logits.dtype), idx


def moe_blocks(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its sparse MoE block (layers with a dense MLP are skipped)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: no decoder layers found (model.model.layers)")
    out = {}
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is not None and hasattr(mlp, "gate") and hasattr(experts, "gate_up_proj"):
            out[i] = mlp
    if not out:
        raise ConfigError(f"{type(model).__name__}: no sparse MoE layers (expected block.gate and block.experts with "
                          "fused gate_up_proj/down_proj, as in Mixtral, Qwen2-MoE and Qwen3-MoE)")
    return out


def moe_identity(model: torch.nn.Module) -> MoEIdentity:
    cfg = model.config
    blocks = moe_blocks(model)
    first = next(iter(blocks.values()))
    e, two_i, h = first.experts.gate_up_proj.shape
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    return MoEIdentity(architecture=arch, num_layers=cfg.num_hidden_layers, moe_layers=tuple(blocks),
                       num_experts=int(e), top_k=int(first.gate.top_k), hidden_size=int(h),
                       expert_intermediate_size=int(two_i // 2),
                       renormalize=bool(getattr(cfg, "norm_topk_prob", True)),
                       shared_expert=hasattr(first, "shared_expert"))


#: model -> {layer: (gate module, gate_up_proj, down_proj, num_experts)} of the original blocks
_originals: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, tuple]]" = weakref.WeakKeyDictionary()


def apply_maps(model: torch.nn.Module, maps: Mapping[int, LayerMaps]) -> None:
    """Swap every MoE block to its maps (restoring any earlier swap first)."""
    restore(model)
    blocks = moe_blocks(model)
    ident = moe_identity(model)
    if set(maps) != set(blocks):
        raise ConfigError(f"maps cover layers {sorted(maps)}, the model's MoE layers are {sorted(blocks)}")
    saved = {}
    for layer, m in maps.items():
        block = blocks[layer]
        ex = block.experts
        if m.num_experts != ex.gate_up_proj.shape[0]:
            raise ConfigError(f"layer {layer}: maps have {m.num_experts} columns, the block has "
                              f"{ex.gate_up_proj.shape[0]} experts")
        saved[layer] = (block.gate, ex.gate_up_proj, ex.down_proj, ex.num_experts)
        block.gate = MappedRouter(saved[layer][0].weight, m.route, m.top_k, ident.renormalize)
        with torch.no_grad():
            ex.gate_up_proj = torch.nn.Parameter(merge_experts(saved[layer][1].data, m.merge), requires_grad=False)
            ex.down_proj = torch.nn.Parameter(merge_experts(saved[layer][2].data, m.merge), requires_grad=False)
        ex.num_experts = m.num_kept
    _originals[model] = saved


def restore(model: torch.nn.Module) -> bool:
    """Put the original gates and experts back; False if nothing was swapped."""
    saved = _originals.pop(model, None)
    if not saved:
        return False
    blocks = moe_blocks(model)
    for layer, (gate, gate_up, down, n) in saved.items():
        blocks[layer].gate = gate
        blocks[layer].experts.gate_up_proj, blocks[layer].experts.down_proj = gate_up, down
        blocks[layer].experts.num_experts = n
    return True


def enable(model: torch.nn.Module, method: str, config: Any = None, plan: Any = None, **options: Any
           ) -> dict[int, LayerMaps]:
    """Apply expert-pruning ``method``'s ``plan`` (a path or the plan object) to a loaded model
    (``overdrive.transformers.enable(model, NAME, plan=...)``); ``config`` is accepted for the generic
    signature and must be None: a plan carries its options."""
    if config is not None or options:
        raise ConfigError(f"{method}: enable takes only plan=PATH (the plan carries its options), got "
                          f"{['config'] if config is not None else []}{sorted(options)}")
    import overdrive

    spec = overdrive.get_method(method, Kind.EXPERT_PRUNING)
    impl: ExpertPruningMethod = spec.load_impl()
    if plan is None:
        raise ConfigError(f"{method}: give plan=PATH (from `overdrive calibrate --method {method}`)")
    maps = impl.layer_maps(impl.load_plan(plan) if isinstance(plan, (str, Path)) else plan, moe_identity(model))
    apply_maps(model, maps)
    return maps


def disable(model: torch.nn.Module) -> bool:
    return restore(model)


class TransformersExpertSession:
    """:class:`~overdrive.contracts.expert_pruning.ExpertSession` over a loaded transformers MoE model."""

    def __init__(self, model: torch.nn.Module, batch_tokens: int = 4096) -> None:
        self.model = model.eval()
        self.identity = moe_identity(model)
        self.batch_tokens = batch_tokens
        self.device = next(model.parameters()).device

    def _batches(self, records: Sequence[TaskRecord]) -> list[list[TaskRecord]]:
        order = sorted(records, key=lambda r: len(r.prompt) + len(r.answer))
        out, cur, longest = [], [], 0
        for r in order:
            n = len(r.prompt) + len(r.answer)
            if cur and max(longest, n) * (len(cur) + 1) > self.batch_tokens:
                out.append(cur)
                cur, longest = [], 0
            cur.append(r)
            longest = max(longest, n)
        return out + ([cur] if cur else [])

    @torch.inference_mode()
    def _loglik(self, records: Sequence[TaskRecord]) -> float:
        total, count = 0.0, 0
        for batch in self._batches(records):
            n = max(len(r.prompt) + len(r.answer) for r in batch)
            ids = torch.zeros(len(batch), n, dtype=torch.long)
            att = torch.zeros(len(batch), n, dtype=torch.long)
            target = torch.full((len(batch), n), -100, dtype=torch.long)
            for i, r in enumerate(batch):
                seq = r.prompt + r.answer
                ids[i, : len(seq)] = torch.tensor(seq)
                att[i, : len(seq)] = 1
                target[i, len(r.prompt): len(seq)] = torch.tensor(r.answer)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = target[:, 1:].to(self.device)
            mask = tgt != -100
            picked = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total += float(picked[mask].double().sum())
            count += int(mask.sum())
        if count == 0:
            raise ConfigError("task records have no answer tokens to score")
        return total / count

    def score(self, records: Sequence[TaskRecord], maps: Mapping[int, LayerMaps] | None) -> float:
        if maps is None:
            restore(self.model)
            return self._loglik(records)
        apply_maps(self.model, maps)
        try:
            return self._loglik(records)
        finally:
            restore(self.model)

    @torch.inference_mode()
    def stats(self, records: Sequence[TaskRecord]) -> dict[int, ExpertStats]:
        restore(self.model)
        blocks = moe_blocks(self.model)
        e = self.identity.num_experts
        acc = {l: [torch.zeros(e, dtype=torch.float64) for _ in range(4)] for l in blocks}  # freq, mass, sal, routed

        def hook(layer: int):
            def fn(block, args, kwargs):
                h = (args[0] if args else kwargs["hidden_states"]).reshape(-1, block.gate.weight.shape[1])
                logits = torch.nn.functional.linear(h, block.gate.weight)
                _, w, idx = mapped_routing(logits, torch.eye(e, dtype=torch.float32, device=h.device),
                                           block.gate.top_k, self.identity.renormalize)
                freq, mass, sal, routed = acc[layer]
                ex = block.experts
                for j in range(e):
                    tok, slot = torch.where(idx == j)
                    freq[j] += tok.numel()
                    if tok.numel() == 0:
                        continue
                    gate, up = torch.nn.functional.linear(h[tok], ex.gate_up_proj[j]).chunk(2, dim=-1)
                    y = torch.nn.functional.linear(ex.act_fn(gate) * up, ex.down_proj[j])
                    wj = w[tok, slot].double().cpu()
                    mass[j] += float(wj.sum())
                    sal[j] += float((wj * y.double().norm(dim=-1).cpu()).sum())
                    routed[j] += tok.numel()
            return fn

        handles = [blocks[l].register_forward_pre_hook(hook(l), with_kwargs=True) for l in blocks]
        try:
            self._loglik(records)
        finally:
            for hd in handles:
                hd.remove()
        out = {}
        for l, (freq, mass, sal, routed) in acc.items():
            slots = freq.sum().clamp_min(1)
            tokens = slots / self.identity.top_k
            out[l] = ExpertStats(frequency=freq / slots, gate_mass=mass / tokens.clamp_min(1),
                                 saliency=sal / routed.clamp_min(1))
        return out


def load_model(path: Path, device: str, dtype: str) -> tuple[torch.nn.Module, Any]:
    """A transformers causal LM and its tokenizer from a checkpoint directory, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {path}: no config.json (expected a transformers checkpoint directory)")
    from overdrive.contracts.llm_calibration import check_device

    device = check_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def read_task(path: Path, tokenizer: Any, option: str = "--task") -> list[TaskRecord]:
    """Task records from JSON lines ``{"prompt": ..., "answer": ...}`` or a plain text file (every
    line-separated paragraph scored in full)."""
    from overdrive.config import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option} {path}: file not found")
    records = []
    if path.suffix == ".jsonl":
        for n, obj in read_jsonl(path, option):
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("answer"), str):
                raise ConfigError(f"{path}:{n}: expected {{\"prompt\": str, \"answer\": str}}")
            p = tokenizer(obj["prompt"], add_special_tokens=True)["input_ids"]
            a = tokenizer(obj["answer"], add_special_tokens=False)["input_ids"]
            if not a:
                raise ConfigError(f"{path}:{n}: the answer has no tokens")
            records.append(TaskRecord(list(p), list(a)))
    else:
        for para in (x.strip() for x in path.read_text().split("\n\n")):
            ids = tokenizer(para, add_special_tokens=True)["input_ids"] if para else []
            if len(ids) >= 2:
                records.append(TaskRecord(list(ids[:1]), list(ids[1:])))
    if len(records) < 2:
        raise ConfigError(f"{option} {path}: need at least 2 records (one for the search, one for the dev choice)")
    return records


def calibrate_command(args: argparse.Namespace) -> int:
    """``overdrive calibrate --method NAME`` for every expert-pruning method (its ``MethodCommand.run``)."""
    import overdrive

    spec = overdrive.get_method(args.method, Kind.EXPERT_PRUNING)
    impl = spec.load_impl()
    options = impl.options_from_args(args)
    if Path(args.output).exists():
        raise ConfigError(f"--output {args.output}: already exists")
    model, tok = load_model(args.model, args.device, args.dtype)
    records = read_task(args.task, tok)
    n_dev = max(1, round(len(records) * args.dev_fraction))
    gen = torch.Generator().manual_seed(options.seed)
    perm = torch.randperm(len(records), generator=gen).tolist()
    dev = [records[i] for i in perm[:n_dev]]
    train = [records[i] for i in perm[n_dev:]]
    session = TransformersExpertSession(model)
    plan = impl.search(session, train, dev, options, progress=lambda msg: print(msg, file=sys.stderr))
    plan.save(Path(args.output))
    print(f"wrote {args.output}: {impl.summary(plan)}")
    return 0


__all__ = ["MappedRouter", "TransformersExpertSession", "apply_maps", "calibrate_command", "disable", "enable",
           "load_model", "moe_blocks", "moe_identity", "read_task", "restore"]

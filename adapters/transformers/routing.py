"""transformers side of token-routing methods (kind ``token_routing``): the reference loop.

    import overdrive.transformers
    out = overdrive.transformers.routed_generate(small, large, "r2r", router="./router", input_ids=ids,
                                                 max_new_tokens=128)
    out.tokens, out.routed, out.num_routed

One sequence at a time, each model with its own KV cache. Every step the small model extends its
cache by the tokens it has not seen (the prompt, then one accepted token), returns its logits and
last hidden state (``hidden_states[-1]``: after the final norm in transformers 5), samples a token,
and the router scores it; a routed position calls the large model on everything it has not seen
since its last call (an incremental extend) and takes its token instead. The bookkeeping is the
shared :class:`~overdrive.contracts.token_routing.RoutedSequence`, the same the vLLM server uses.

Exact by construction at the ends: threshold 0 routes every position, so the tokens are the large
model's greedy tokens; threshold 1 routes none, so they are the small model's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

import overdrive
from overdrive.contracts.token_routing import RoutedSequence, Router, RouterInputs, route_mask
from overdrive.kinds import Kind


@dataclasses.dataclass
class RoutedOutput:
    tokens: list[int]
    routed: list[bool]
    scores: list[float]          # the router logit at each position
    finish_reason: str

    @property
    def num_routed(self) -> int:
        return sum(self.routed)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to top-k / top-p."""
    logits = logits.float()
    if temperature <= 0.0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < top_p
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, si, keep)
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def resolve_router(method: str, router: Router | str | Path, small: Any) -> Router:
    if isinstance(router, (str, Path)):
        impl = overdrive.get_method(method, Kind.ROUTING).load_impl()
        small_dir = getattr(getattr(small, "config", None), "_name_or_path", None)
        if not small_dir or not Path(small_dir).is_dir():
            raise ValueError(f"cannot locate the small model's checkpoint folder (config._name_or_path="
                             f"{small_dir!r}) to check the router against; load the router yourself and pass it")
        return impl.load_router(router, small_dir, device=_device(small))
    return router


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _stop_ids(model: Any, ignore_eos: bool, extra: Sequence[int]) -> frozenset[int]:
    ids = set(extra)
    if not ignore_eos:
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return frozenset(ids)


@torch.no_grad()
def routed_generate(small: Any, large: Any, method: str, router: Router | str | Path | None = None, *,
                    input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 64, threshold: float | None = None,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    generator: torch.Generator | None = None, ignore_eos: bool = False,
                    stop_token_ids: Sequence[int] = ()) -> RoutedOutput:
    """Generate one sequence with ``small`` and ``large`` (transformers causal LMs sharing a tokenizer),
    routing positions with ``router`` (a loaded router, or its folder for ``method``)."""
    from transformers import DynamicCache

    if router is None:
        raise ValueError("routed_generate needs a router (a loaded router or its folder)")
    router = resolve_router(method, router, small)
    threshold = router.threshold if threshold is None else float(threshold)
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise ValueError(f"routed_generate takes one sequence; got a batch of {len(ids)}")
        ids = ids[0]
    seq = RoutedSequence(ids, max_new_tokens, _stop_ids(small, ignore_eos, stop_token_ids))
    dev_s, dev_l = _device(small), _device(large)
    small_cache, large_cache = DynamicCache(), DynamicCache()
    scores: list[float] = []
    while not seq.finished:
        out = small(input_ids=torch.tensor([seq.small_feed()], device=dev_s), past_key_values=small_cache,
                    use_cache=True, output_hidden_states=True)
        logits = out.logits[0, -1].float()
        token = sample(logits, temperature, top_p, top_k, generator)
        z = router.scores(RouterInputs(out.hidden_states[-1][0, -1:].float(), logits.topk(router.topk).values[None],
                                       torch.tensor([token])))
        routed = bool(route_mask(z, threshold)[0])
        scores.append(float(z[0]))
        if routed:
            lo = large(input_ids=torch.tensor([seq.large_feed()], device=dev_l), past_key_values=large_cache,
                       use_cache=True)
            token = sample(lo.logits[0, -1], temperature, top_p, top_k, generator)
        seq.accept(token, routed)
    return RoutedOutput(seq.tokens, seq.routed, scores, seq.finish_reason or "length")

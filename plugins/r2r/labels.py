"""R2R's label pipeline: which of the small model's tokens would change the large model's answer.

For each query (transformers causal LMs sharing one tokenizer):

1. **Large answers.** The large model answers greedily (or the data carries the answers).
2. **Teacher-forced small prefill.** The small model reads prompt + answer in one forward pass; at each
   answer position it records its last hidden state (after the final norm), its top-k raw logits and
   its own greedy token. Where that token equals the large model's, the position is *identical*
   (label 0).
3. **Continuations.** At each mismatch the large model continues greedily from both tokens — the
   small model's and its own — up to the next sentence end (a token whose text holds one of
   ``sentence_end``, or an end-of-sequence token) or ``continuation_tokens`` tokens.
4. **Judge.** A pluggable :class:`Judge` labels each mismatch 0 (neutral: same meaning) or 1
   (divergent). The default, :class:`AgreementJudge`, is the large model's own continuation agreement:
   neutral when the large model, continuing after the small token, writes the same rest of the sentence
   as after its own token (optionally also requiring the small token to be within ``margin`` nats of
   its own under the large model). It cannot see a difference confined to the mismatch token itself
   (e.g. another digit with identical surroundings); for real pairs plug in an LLM judge
   (``--judge package.module:factory``), as R2R does with Qwen2.5-72B-Instruct.

The result is a :class:`LabelSet` of router inputs (hidden, top-k logits, small token) with 0/1
labels, saved as safetensors.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.progress import progress

KIND_IDENTICAL, KIND_NEUTRAL, KIND_DIVERGENT = 0, 1, 2


@dataclasses.dataclass
class LabelOptions:
    topk: int = 100
    max_new_tokens: int = 256          # length of the large model's answers when it writes them
    continuation_tokens: int = 32      # longest continuation from a mismatch
    sentence_end: str = ".!?\n"        # characters whose token ends a sentence

    def __post_init__(self) -> None:
        if self.topk < 1 or self.max_new_tokens < 1 or self.continuation_tokens < 1:
            raise ConfigError(f"label options must be positive: topk {self.topk}, max_new_tokens "
                              f"{self.max_new_tokens}, continuation_tokens {self.continuation_tokens}")


@dataclasses.dataclass
class Divergence:
    """One mismatch, as the judge sees it (token ids; ``decode`` turns them into text)."""

    context: list[int]              # prompt + the large answer before the mismatch
    small_token: int
    large_token: int
    small_continuation: list[int]   # the large model's tokens after small_token (to the sentence end)
    large_continuation: list[int]   # ... after large_token
    small_logprob: float            # log p_large(small_token | context)
    large_logprob: float            # log p_large(large_token | context)
    decode: Callable[[Sequence[int]], str] = dataclasses.field(repr=False, default=lambda ids: str(list(ids)))


class Judge(Protocol):
    def __call__(self, cases: Sequence[Divergence]) -> list[int]:
        """0 (neutral) or 1 (divergent) for each case."""


@dataclasses.dataclass
class AgreementJudge:
    """Neutral iff both continuations are the same tokens (and, with a finite ``margin``, the large
    model's log-probability of the small token is within ``margin`` nats of its own token's)."""

    margin: float = math.inf

    def __call__(self, cases: Sequence[Divergence]) -> list[int]:
        return [0 if (c.small_continuation == c.large_continuation
                      and c.large_logprob - c.small_logprob <= self.margin) else 1 for c in cases]


@dataclasses.dataclass
class LabelSet:
    """Router training data: one row per answer position."""

    hidden: torch.Tensor        # (N, d) float32
    topk_logits: torch.Tensor   # (N, k) float32, descending
    token: torch.Tensor         # (N,) int64: the small model's token
    label: torch.Tensor         # (N,) int64: 0 identical/neutral, 1 divergent
    kind: torch.Tensor          # (N,) int64: 0 identical, 1 neutral, 2 divergent
    sample: torch.Tensor        # (N,) int64: which query the row came from
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def counts(self) -> dict[str, int]:
        return {"positions": len(self), "identical": int((self.kind == KIND_IDENTICAL).sum()),
                "neutral": int((self.kind == KIND_NEUTRAL).sum()), "divergent": int((self.kind == KIND_DIVERGENT).sum())}

    def save(self, path: str | Path) -> Path:
        """safetensors file (written atomically); ``meta`` goes into its metadata as JSON."""
        import os
        import tempfile

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({f: getattr(self, f).contiguous() for f in _TENSORS}, tmp,
                      metadata={"format": "overdrive.r2r.labels", "meta": json.dumps(self.meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LabelSet":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such labels file (write one with `overdrive calibrate --method r2r "
                              "--labels-out FILE`)")
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != "overdrive.r2r.labels":
                raise ConfigError(f"{path}: not an R2R labels file (metadata format {md.get('format')!r})")
            missing = [t for t in _TENSORS if t not in f.keys()]
            if missing:
                raise ConfigError(f"{path}: lacks tensors {missing}")
            data = {t: f.get_tensor(t) for t in _TENSORS}
        n = data["label"].shape[0]
        for t, v in data.items():
            if v.shape[0] != n:
                raise ConfigError(f"{path}: tensor {t!r} has {v.shape[0]} rows, 'label' has {n}")
        return cls(**data, meta=json.loads(md.get("meta", "{}")))


_TENSORS = ("hidden", "topk_logits", "token", "label", "kind", "sample")


# ----------------------------------------------------------------------------------- pipeline
def sentence_end_ids(tokenizer, chars: str, vocab_size: int) -> torch.Tensor:
    """(V,) bool: tokens whose text contains a sentence-end character, plus end-of-sequence tokens."""
    ends = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i])
        if any(c in text for c in chars):
            ends[i] = True
    for eos in _eos_ids(tokenizer):
        if eos < vocab_size:
            ends[eos] = True
    return ends


def _eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


@torch.no_grad()
def greedy_answer(model, prompt: list[int], max_new_tokens: int, stop_ids: Sequence[int]) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(stop_ids) or None, pad_token_id=(list(stop_ids) or [0])[0])
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def teacher_forced(small, prompt: list[int], answer: list[int], topk: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden (T, d), top-k logits (T, k), greedy tokens (T,)) of the small model at the T answer positions."""
    ids = torch.tensor([prompt + answer], device=small.device)
    out = small(input_ids=ids, output_hidden_states=True, use_cache=False)
    sl = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
    logits = out.logits[0, sl].float()
    return out.hidden_states[-1][0, sl].float().cpu(), logits.topk(topk, dim=-1).values.cpu(), logits.argmax(-1).cpu()


@torch.no_grad()
def continue_both(large, context: list[int], small_token: int, large_token: int, max_tokens: int,
                  ends: torch.Tensor) -> tuple[list[int], list[int], float, float]:
    """Greedy continuations of the large model after each token, to the sentence end; and the large
    model's log-probabilities of the two tokens at the mismatch."""
    ids = torch.tensor([context + [small_token], context + [large_token]], device=large.device)
    out = large(input_ids=ids, use_cache=True)  # the model makes its own (dynamic) KV cache
    cache = out.past_key_values
    lp = torch.log_softmax(out.logits[0, len(context) - 1].double(), -1)
    conts: list[list[int]] = [[], []]
    done = [bool(ends[small_token]), bool(ends[large_token])]
    logits = out.logits[:, -1]
    for _ in range(max_tokens):
        if all(done):
            break
        nxt = logits.argmax(-1)
        for r in range(2):
            if not done[r]:
                conts[r].append(int(nxt[r]))
                done[r] = bool(ends[int(nxt[r])])
        out = large(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    return conts[0], conts[1], float(lp[small_token]), float(lp[large_token])


def label_pairs(small, large, tokenizer, prompts: Sequence[list[int]], opts: LabelOptions,
                judge: Judge | None = None, answers: Sequence[list[int] | None] | None = None) -> LabelSet:
    """Run steps 1-4 (module docstring) over ``prompts`` (token ids); ``answers[i]`` skips step 1."""
    judge = judge or AgreementJudge()
    vocab = int(small.get_output_embeddings().weight.shape[0])
    if vocab != int(large.get_output_embeddings().weight.shape[0]):
        raise ConfigError(f"small and large models have different vocabularies ({vocab} vs "
                          f"{large.get_output_embeddings().weight.shape[0]}); R2R needs one shared tokenizer")
    if opts.topk > vocab:
        raise ConfigError(f"--topk {opts.topk} exceeds the vocabulary size {vocab}")
    ends = sentence_end_ids(tokenizer, opts.sentence_end, vocab)
    stop = _eos_ids(tokenizer)
    small.eval()
    large.eval()
    rows: dict[str, list[torch.Tensor]] = {t: [] for t in _TENSORS}
    for i, prompt in enumerate(progress(prompts, desc="r2r: labelling", unit="query")):
        answer = answers[i] if answers is not None and answers[i] is not None else None
        if answer is None:
            answer = greedy_answer(large, prompt, opts.max_new_tokens, stop)
        if not answer:
            continue
        hidden, topk, small_tok = teacher_forced(small, prompt, answer, opts.topk)
        large_tok = torch.tensor(answer)
        kind = torch.zeros(len(answer), dtype=torch.long)
        cases, where = [], []
        for t in torch.nonzero(small_tok != large_tok).flatten().tolist():
            ctx = prompt + answer[:t]
            sc, lc, slp, llp = continue_both(large, ctx, int(small_tok[t]), answer[t], opts.continuation_tokens, ends)
            cases.append(Divergence(ctx, int(small_tok[t]), answer[t], sc, lc, slp, llp, decode=tokenizer.decode))
            where.append(t)
        if cases:
            verdicts = judge(cases)
            if len(verdicts) != len(cases) or any(v not in (0, 1) for v in verdicts):
                raise ConfigError(f"the judge returned {verdicts!r} for {len(cases)} cases; expected one 0/1 each")
            for t, v in zip(where, verdicts):
                kind[t] = KIND_DIVERGENT if v else KIND_NEUTRAL
        rows["hidden"].append(hidden)
        rows["topk_logits"].append(topk)
        rows["token"].append(small_tok.long())
        rows["kind"].append(kind)
        rows["label"].append((kind == KIND_DIVERGENT).long())
        rows["sample"].append(torch.full((len(answer),), i, dtype=torch.long))
    if not rows["label"]:
        raise ConfigError("no answer positions to label (empty answers)")
    data = {t: torch.cat(v) for t, v in rows.items()}
    return LabelSet(**data, meta={"queries": len(prompts), **dataclasses.asdict(opts)})

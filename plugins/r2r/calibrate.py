"""``overdrive calibrate --method r2r``: label small/large mismatches and train the router.

    overdrive calibrate --method r2r --small ./R1-1.5B --large ./R1-32B --data queries.jsonl \\
        --output ./router --labels-out labels.safetensors
    overdrive calibrate --method r2r --small ./R1-1.5B --labels labels.safetensors --output ./router2  # retrain

``--data`` is JSON lines, one query per line: ``{"prompt": "..."}`` (plain text),
``{"messages": [{"role": "user", "content": "..."}]}`` (rendered with the tokenizer's chat template
and its generation prompt), either optionally with ``"answer": "..."`` (the large model's answer is
then not generated). Without ``--data`` a few built-in prompts run (a smoke test, not a router worth
serving). Steps and defaults: :mod:`overdrive.r2r.labels` and :mod:`overdrive.r2r.train`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from overdrive.config import ConfigError, read_jsonl
from overdrive.contracts.llm_calibration import check_device, load_for_calibration, load_tokenizer

from .config import R2RRouterConfig
from .labels import AgreementJudge, LabelOptions, LabelSet, label_pairs
from .router import save_router, small_model_identity
from .train import TrainOptions, train_router

#: built-in queries so the command runs out of the box (a smoke test; real routers need real data)
BUILTIN_PROMPTS = [
    "the quick brown fox", "hello world, this is", "one two three four five", "describe the video.",
    "the model answers questions about", "a cat sits on a red mat", "quantization of weights and",
    "overdrive makes efficient inference", "what happens in this image?", "seven eight nine ten",
    "the lazy dog", "tokens, frames, pixels",
]


def read_queries(path: Path | None, tokenizer) -> tuple[list[list[int]], list[list[int] | None]]:
    """(prompt ids, answer ids or None) per query."""
    if path is None:
        return [tokenizer(p, add_special_tokens=False).input_ids for p in BUILTIN_PROMPTS], [None] * len(BUILTIN_PROMPTS)
    prompts, answers = [], []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not (isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list)):
            raise ConfigError(f"{path}:{n}: expected an object with a string 'prompt' or a list 'messages'")
        if "messages" in rec:
            ids = tokenizer.apply_chat_template(rec["messages"], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer(rec["prompt"], add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"{path}:{n}: the prompt has no tokens")
        answer = rec.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ConfigError(f"{path}:{n}: 'answer' must be a string")
        prompts.append(list(ids))
        answers.append(tokenizer(answer, add_special_tokens=False).input_ids if answer else None)
    if not prompts:
        raise ConfigError(f"--data {path}: no queries")
    return prompts, answers


def make_judge(spec: str, margin: float, small, large, tokenizer):
    if spec == "agreement":
        return AgreementJudge(margin=margin)
    from overdrive.spec import _resolve

    try:
        factory = _resolve(spec)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"--judge {spec!r}: cannot import it ({e}); use 'agreement' or 'package.module:factory'") from None
    return factory(small=small, large=large, tokenizer=tokenizer)


def _load_lm(path: Path, device: str | None, dtype: str = "float32") -> torch.nn.Module:
    """The whole model on ``device`` (labelling generates with a KV cache), through the LLM calibration layer."""
    run = load_for_calibration(path, device=device, dtype=dtype)
    run.close()  # the model keeps its own attention; only the loading and placement are the layer's
    return run.resident_model().eval()


def calibrate(args: argparse.Namespace) -> Path:
    from overdrive.contracts.token_routing import check_shared_tokenizer

    if args.labels_only and (args.labels_out is None or args.labels is not None):
        raise ConfigError("--labels-only needs --labels-out (and no --labels)")
    if not args.labels_only and Path(args.output).exists():
        raise ConfigError(f"{args.output}: already exists; choose a new --output directory")
    ident, emb = small_model_identity(args.small)
    if args.labels is not None:
        data = LabelSet.load(args.labels)
        topk = args.topk or int(data.topk_logits.shape[1])
    else:
        topk = args.topk or 100
        if args.large is None:
            raise ConfigError("--large is required unless --labels gives ready labels")
        tok = load_tokenizer(args.small)
        try:
            check_shared_tokenizer(tok, load_tokenizer(args.large), str(args.small), str(args.large))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        prompts, answers = read_queries(args.data, tok)
        if args.limit:
            prompts, answers = prompts[:args.limit], answers[:args.limit]
        device = check_device(getattr(args, "device", None))
        dtype = getattr(args, "dtype", "float32")
        small, large = _load_lm(args.small, device, dtype), _load_lm(args.large, device, dtype)
        opts = LabelOptions(topk=topk, max_new_tokens=args.max_new_tokens,
                            continuation_tokens=args.continuation_tokens, sentence_end=args.sentence_end)
        judge = make_judge(args.judge, args.judge_margin, small, large, tok)
        data = label_pairs(small, large, tok, prompts, opts, judge, answers)
        data.meta.update({"small": str(args.small), "large": str(args.large),
                          "data": str(args.data) if args.data else "builtin", "judge": args.judge})
        if args.labels_out is not None:
            data.save(args.labels_out)
        del small, large
        if args.labels_only:
            print(f"r2r labels -> {args.labels_out}: {data.counts()}", file=sys.stderr)
            return args.labels_out
    arch = R2RRouterConfig(topk=topk, width=args.width, num_blocks=args.blocks, expansion=args.expansion,
                           dropout=args.dropout, small_model=ident)
    topts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         recall=args.recall, val_fraction=args.val_fraction, seed=args.seed)
    net, cfg = train_router(data, arch, emb, topts)
    out = save_router(args.output, cfg, net)
    t = cfg.training
    print(f"r2r router -> {out}: threshold {cfg.threshold:.4g} (recall {t['recall']:.3f} of divergent tokens, routes "
          f"{t['routed_fraction']:.3f} of positions on the {t['threshold_from']} split); labels {t['labels']}",
          file=sys.stderr)
    return out

"""VocabTailor on real small LMs: coverage, accuracy, perplexity, a generation score, memory and speed.

    python -m overdrive.benchmarks.vocabtailor --models smollm2 gemma3 --json docs/benchmarks/vocabtailor-cpu-DATE.json

Data: Newton's *Opticks* (overdrive.testing.real). The static set is profiled from the First Book
(paragraphs as documents) with ``overdrive calibrate --method vocabtailor``; evaluation uses ``--prompts``
windows spread over the Second and Third Books: a ``--prompt-len``-token prompt and the next
``--cont-len`` tokens. For each mode (full vocabulary, static-only, dynamic-only = prompt + special,
hybrid) through ``overdrive.transformers.enable`` (the adapter users run; the request's vocabulary is
made from the prompt only). The teacher-forced pass over prompt + continuation runs once with the full
vocabulary; each mode's logits are those with the adapter's allowed set for the prompt masked in (what the
adapter returns, tested equal to 1e-12 in plugins/vocabtailor/tests), so the body runs once per prompt:

* coverage: fraction of continuation tokens inside the request's allowed set;
* top-1: fraction of continuation positions whose highest allowed logit is the true next token;
* perplexity on the allowed set: exp(mean NLL) with the softmax over the allowed set, on the covered
  tokens (an uncovered token has probability 0), beside the full model's perplexity on the same tokens;
* generation task (continuation): greedy ``--gen-len`` tokens from each prompt, ROUGE-L F1 (token LCS)
  against the true continuation, and agreement with the full model's greedy tokens;
* vocabulary memory on the device: the adapter's resident + batch rows (``device_bytes``) vs the full
  embedding + LM head, batch 1;
* decode tokens/s of that greedy generation (batch 1), vs the full model, same run.

Models: SmolLM2-135M (vocabulary 49,152) and Gemma-3-270M (262,144; BOS prepended). Float32.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from overdrive.benchmarks import header, write_json

MODES = ("full", "static", "dynamic", "hybrid")


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 between two token sequences (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overdrive.testing import real

    path = real.smollm2_135m() if name == "smollm2" else real.gemma3_270m()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, tok, model


def windows(tok, text: str, n: int, prompt_len: int, cont_len: int, bos: bool) -> list[tuple[list[int], list[int]]]:
    ids = tok(text, add_special_tokens=False).input_ids
    span = prompt_len + cont_len
    if len(ids) < n * span:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than {n} x {span}")
    step = (len(ids) - span) // max(1, n - 1)
    out = []
    for i in range(n):
        s = i * step
        prompt = ids[s:s + prompt_len]
        out.append(([tok.bos_token_id, *prompt] if bos else prompt, ids[s + prompt_len:s + span]))
    return out


def evaluate(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import overdrive.transformers as odt
    from overdrive.cli import main as cli_main
    from overdrive.testing.real import opticks_split

    t0 = time.time()
    path, tok, model = load(name)
    first, rest = opticks_split()
    corpus = tmp / f"{name}-book1.txt"
    corpus.write_text(first)
    profile = tmp / f"{name}-profile.json"
    opts = ["--min-doc-freq", str(args.min_doc_freq), "--tolerance", str(args.tolerance)]
    if cli_main(["calibrate", "--method", "vocabtailor", "--model", str(path), "--corpus", str(corpus),
                 "--output", str(profile), *opts]) != 0:
        raise RuntimeError("profiling failed")
    prof = json.loads(profile.read_text())
    data = windows(tok, rest, args.prompts, args.prompt_len, args.cont_len, bos=name == "gemma3")
    vocab, hidden = model.get_output_embeddings().weight.shape
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    full_bytes = vocab * hidden * 4 * (1 if tied else 2)
    gen_kw = dict(max_new_tokens=args.gen_len, min_new_tokens=args.gen_len, do_sample=False,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    res: dict[str, Any] = {"model": name, "vocab_size": vocab, "hidden": hidden, "tied": tied,
                           "profile": {"static_size": len(prof["static_ids"]), "special": len(prof["special_ids"]),
                                       "stats": prof["stats"], "options": prof["options"]},
                           "modes": {}}
    full_greedy: list[list[int]] = []
    full_logits = []
    for prompt, cont in data:  # teacher-forced once: the adapter's logits are these, masked (tested to 1e-12)
        with torch.no_grad():
            full_logits.append(model(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1:-1].double())
    full_nll: list[torch.Tensor] = []
    for mode in MODES:
        att = None
        if mode != "full":
            att = odt.enable(model, "vocabtailor", profile=str(profile), mode=mode, tokenizer=tok)
        hits = covered = total = 0
        nll, nll_full = [], []
        mem, rl, agree, dec_tok, dec_s = [], [], [], 0, 0.0
        for i, (prompt, cont) in enumerate(data):
            pred = full_logits[i]
            if att is not None:  # the request's allowed set, as the adapter builds it for this prompt
                allowed = att.set_requests([torch.tensor(prompt)]).full_mask()[0]
                mem.append(att.device_bytes()["total"])
                pred = pred.masked_fill(~allowed, float("-inf"))
            target = torch.tensor(cont)
            lp = torch.log_softmax(pred, -1).gather(1, target[:, None])[:, 0]  # softmax over the allowed set
            ok = torch.isfinite(lp)
            total += len(cont)
            covered += int(ok.sum())
            hits += int((pred.argmax(-1) == target).sum())
            nll.extend((-lp[ok]).tolist())
            if mode == "full":
                full_nll.append(-lp)
            else:
                nll_full.extend(full_nll[i][ok].tolist())
            if i < args.gen_prompts:
                p = torch.tensor([prompt])
                with torch.no_grad():
                    t = time.perf_counter()
                    g = model.generate(p, **gen_kw)[0, len(prompt):].tolist()
                    dec_s += time.perf_counter() - t
                dec_tok += len(g)
                rl.append(rouge_l(g, cont[:args.gen_len]))
                if mode == "full":
                    full_greedy.append(g)
                agree.append(sum(a == b for a, b in zip(g, full_greedy[i])) / len(g))
        if att is not None:
            odt.disable(model)
        r = {"coverage": covered / total, "top1": hits / total,
             "ppl_allowed": math.exp(sum(nll) / len(nll)) if nll else None,
             "gen_rouge_l": sum(rl) / len(rl), "gen_agreement_with_full": sum(agree) / len(agree),
             "decode_tokens_per_s": dec_tok / dec_s,
             "vocab_device_bytes": (sum(mem) / len(mem)) if mem else full_bytes}
        if nll_full:
            r["ppl_full_model_same_tokens"] = math.exp(sum(nll_full) / len(nll_full))
        r["vocab_memory_reduction"] = 1 - r["vocab_device_bytes"] / full_bytes
        res["modes"][mode] = r
        print(f"{name} {mode}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r.items()), flush=True)
    full = res["modes"]["full"]
    for mode in MODES[1:]:
        m = res["modes"][mode]
        m["top1_loss_points"] = 100 * (full["top1"] - m["top1"])
        m["decode_speedup"] = m["decode_tokens_per_s"] / full["decode_tokens_per_s"]
    res["full_vocab_bytes"] = full_bytes
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overdrive.benchmarks.vocabtailor", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=["smollm2", "gemma3"])
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--cont-len", type=int, default=128)
    p.add_argument("--gen-prompts", type=int, default=4, help="prompts of the generation task (and decode timing)")
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--min-doc-freq", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = header("vocabtailor", "cpu", note=args.note, options={k: v for k, v in vars(args).items()
                                                                     if k not in ("json", "note")}, results=[])
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            report["results"].append(evaluate(name, args, Path(tmp)))
            if args.json:
                write_json(args.json, report)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The vocabulary arithmetic of VocabTailor (leaf module: token ids in, token ids out).

* :func:`static_set` — the static task set from a tokenized corpus: every token the corpus produces,
  less those a document-frequency filter and a script filter remove, with the discarded token mass
  bounded by a tolerance (removed tokens come back, most frequent first, until it holds);
* :func:`allowed_sets` — a request's vocabulary: special tokens, plus the static set and/or the
  request's own prompt tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import unicodedata
from typing import Sequence

import torch

from overdrive.config import ConfigError

#: letter "scripts" (first word of the Unicode name) that belong to every script
_COMMON_LETTERS = {"MODIFIER"}


def letter_scripts(text: str) -> set[str]:
    """Scripts of the letters in ``text``: the first word of each letter's Unicode name (LATIN, GREEK, CJK, ...)."""
    out = set()
    for ch in text:
        if unicodedata.category(ch).startswith("L"):
            name = unicodedata.name(ch, "")
            script = name.split(" ", 1)[0] if name else "UNKNOWN"
            if script not in _COMMON_LETTERS:
                out.add(script)
    return out


@dataclasses.dataclass
class StaticSet:
    ids: list[int]
    stats: dict


def static_set(documents: Sequence[Sequence[int]], special_ids: Sequence[int], texts: dict[int, str] | None,
               min_doc_freq: int, tolerance: float, scripts: Sequence[str] | None) -> StaticSet:
    """Choose the static set (see the module docstring). ``texts`` maps each corpus token to its text
    (needed only with ``scripts``). Special tokens are never part of the static set (always allowed)."""
    special = set(int(i) for i in special_ids)
    counts: collections.Counter[int] = collections.Counter()
    df: collections.Counter[int] = collections.Counter()
    n_docs = 0
    for doc in documents:
        ids = [int(t) for t in doc if int(t) not in special]
        if not ids:
            continue
        n_docs += 1
        counts.update(ids)
        df.update(set(ids))
    total = sum(counts.values())
    if total == 0:
        raise ConfigError("the corpus has no tokens besides special tokens: nothing to profile")
    script_drop: set[int] = set()
    if scripts is not None:
        if texts is None:
            raise ValueError("a script filter needs the tokens' texts")
        allowed = {s.upper() for s in scripts}
        script_drop = {t for t in counts if letter_scripts(texts[t]) - allowed}
    script_mass = sum(counts[t] for t in script_drop)
    if script_mass > tolerance * total:
        raise ConfigError(f"the script filter {sorted(scripts or [])} alone discards {script_mass / total:.2%} of the "
                          f"corpus tokens, more than the tolerance {tolerance:.2%}: allow more scripts or raise "
                          "the tolerance")
    df_drop = sorted((t for t in counts if t not in script_drop and df[t] < min_doc_freq),
                     key=lambda t: (-counts[t], t))
    budget = tolerance * total - script_mass
    dropped_mass = sum(counts[t] for t in df_drop)
    restored = 0
    while df_drop and dropped_mass > budget:  # most frequent first
        t = df_drop[restored]
        dropped_mass -= counts[t]
        restored += 1
        if restored == len(df_drop):
            break
    df_drop = df_drop[restored:]
    removed = script_drop | set(df_drop)
    ids = sorted(t for t in counts if t not in removed)
    stats = {
        "documents": n_docs, "tokens": total, "distinct_tokens": len(counts), "static_size": len(ids),
        "discarded_mass": round((script_mass + dropped_mass) / total, 6),
        "discarded_by_script": round(script_mass / total, 6), "tokens_removed_by_script": len(script_drop),
        "discarded_by_doc_freq": round(dropped_mass / total, 6), "tokens_removed_by_doc_freq": len(df_drop),
        "tokens_restored_by_tolerance": restored,
    }
    return StaticSet(ids, stats)


def allowed_sets(special: torch.Tensor, static: torch.Tensor | None,
                 prompts: Sequence[torch.Tensor | None], use_prompt: bool) -> list[torch.Tensor]:
    """Per request: special ∪ static (when given) ∪ its prompt tokens (when ``use_prompt``), ascending."""
    base = special if static is None else torch.cat([special, static])
    out = []
    for p in prompts:
        parts = [base]
        if use_prompt and p is not None:
            parts.append(torch.as_tensor(p, dtype=torch.long).reshape(-1).cpu())
        out.append(torch.unique(torch.cat(parts)))
    return out

"""VocabTailor options and its artifact, the vocabulary profile.

* :class:`VocabTailorConfig` — what ``overdrive.transformers.enable(model, "vocabtailor", ...)`` and
  ``--additional-config '{"vocabtailor": {...}}'`` take: the profile and which sets make a request's
  vocabulary;
* :class:`ProfileOptions` — the filters of offline profiling (``overdrive calibrate --method vocabtailor``);
* :class:`VocabProfile` — the JSON the profiler writes: model identity, special tokens, the static set
  and the statistics of how it was chosen.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from overdrive.config import ConfigError, MethodConfig

#: which sets make a request's vocabulary (special tokens are always in it)
MODES = ("hybrid", "static", "dynamic")


@dataclasses.dataclass
class VocabTailorConfig(MethodConfig):
    """VocabTailor at inference.

    profile  path of the vocabulary profile JSON (``overdrive calibrate --method vocabtailor``)
    mode     "hybrid": static set + the request's prompt tokens + special tokens (the method);
             "static": static set + special tokens; "dynamic": prompt tokens + special tokens
    """

    VERSION = 1
    profile: str = ""
    mode: Literal["hybrid", "static", "dynamic"] = "hybrid"

    def validate(self) -> None:
        if not self.profile:
            raise ConfigError("VocabTailorConfig.profile is required: the path of a vocabulary profile JSON "
                              "(overdrive calibrate --method vocabtailor --model DIR --corpus FILE --output P)")


@dataclasses.dataclass
class ProfileOptions(MethodConfig):
    """Filters that choose the static set from a task corpus.

    min_doc_freq  a token enters the static set only if it occurs in at least this many documents
    tolerance     the most corpus token mass (fraction of all token occurrences) the filters may discard;
                  tokens removed by the document-frequency filter come back, most frequent first, until
                  the discarded mass is within it (a script filter that alone discards more is an error)
    scripts       Unicode scripts a token's letters must belong to (e.g. ["latin"]); null = no script filter.
                  A script is the first word of a letter's Unicode name (LATIN, GREEK, CYRILLIC, CJK, ...);
                  digits, punctuation and symbols belong to every script
    """

    VERSION = 1
    min_doc_freq: int = 2
    tolerance: float = 0.01
    scripts: list[str] | None = None

    def validate(self) -> None:
        if self.min_doc_freq < 1:
            raise ConfigError(f"ProfileOptions.min_doc_freq must be >= 1, got {self.min_doc_freq}")
        if not (math.isfinite(self.tolerance) and 0.0 <= self.tolerance < 1.0):
            raise ConfigError(f"ProfileOptions.tolerance must be a fraction in [0, 1), got {self.tolerance!r}")
        if self.scripts is not None:
            if not self.scripts or not all(isinstance(s, str) and s.strip() for s in self.scripts):
                raise ConfigError(f"ProfileOptions.scripts must be a non-empty list of script names "
                                  f"(e.g. ['latin']) or null, got {self.scripts!r}")
            self.scripts = sorted({s.strip().upper() for s in self.scripts})


@dataclasses.dataclass
class VocabProfile(MethodConfig):
    """A VocabTailor vocabulary profile (JSON).

    model        model identity: architecture, vocab_size, tokenizer_hash (a profile for another model is refused)
    special_ids  the tokenizer's special tokens (always allowed)
    static_ids   the static task set, ascending
    options      the :class:`ProfileOptions` used
    stats        corpus statistics: documents, tokens, distinct tokens, discarded mass per filter
    """

    VERSION = 1
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    special_ids: list[int] = dataclasses.field(default_factory=list)
    static_ids: list[int] = dataclasses.field(default_factory=list)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        from overdrive.contracts.vocab import VocabIdentity  # torch: imported when a profile is used, not listed

        ident = VocabIdentity.from_dict(self.model, source="VocabProfile.model")
        for name in ("special_ids", "static_ids"):
            ids = getattr(self, name)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ConfigError(f"VocabProfile.{name} must be a list of token ids (ints)")
            bad = [i for i in ids if not 0 <= i < ident.vocab_size]
            if bad:
                raise ConfigError(f"VocabProfile.{name}: ids {bad[:5]} outside the model's vocabulary "
                                  f"[0, {ident.vocab_size})")
            if list(ids) != sorted(set(ids)):
                raise ConfigError(f"VocabProfile.{name} must be ascending without repeats")
        if not self.special_ids:
            raise ConfigError("VocabProfile.special_ids is empty: a profile must carry the tokenizer's special "
                              "tokens (at least end-of-sequence)")

    @property
    def identity(self) -> Any:
        from overdrive.contracts.vocab import VocabIdentity

        return VocabIdentity.from_dict(self.model)

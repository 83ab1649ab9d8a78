"""VocabTailor as a framework-neutral vocabulary-selection method.

Re-derived from the idea of VocabTailor (small LMs spend most of their memory on the vocabulary
components; keep the embedding off the accelerator and compute the LM head over a hybrid vocabulary:
a static task set profiled offline, the request's own prompt tokens and the special tokens). No
reference code is copied; unlike the reference it works per request (batches of different prompts),
takes the special tokens from the tokenizer and leaves logits processing to the engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from overdrive.config import ConfigError
from overdrive.contracts.vocab import VocabIdentity, VocabSelectionMethod

from .calibrate import read_documents
from .config import ProfileOptions, VocabProfile, VocabTailorConfig
from .select import allowed_sets, static_set

NAME = "vocabtailor"


class VocabTailor(VocabSelectionMethod):
    def load_profile(self, source: Any) -> VocabProfile:
        if isinstance(source, VocabProfile):
            return source
        if isinstance(source, Mapping):
            return VocabProfile.from_dict(source, source="vocabulary profile")
        if isinstance(source, VocabTailorConfig):
            source = source.profile
        if not isinstance(source, (str, Path)) or not str(source):
            raise ConfigError(f"vocabtailor: profile must be a path to a profile JSON, got {source!r}")
        return VocabProfile.load(source)

    def identity(self, profile: VocabProfile) -> VocabIdentity:
        return profile.identity

    def allowed(self, profile: VocabProfile, cfg: VocabTailorConfig,
                prompts: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        special = torch.tensor(profile.special_ids, dtype=torch.long)
        static = torch.tensor(profile.static_ids, dtype=torch.long) if cfg.mode != "dynamic" else None
        return allowed_sets(special, static, prompts, use_prompt=cfg.mode != "static")

    def documents(self, args: Any) -> list[str]:
        return read_documents(args.corpus, getattr(args, "field", None))

    def profile_options(self, args: Any) -> ProfileOptions:
        from .cli import profile_options

        return profile_options(args)

    def build_profile(self, documents: Sequence[Sequence[int]], model: VocabIdentity, special_ids: Sequence[int],
                      token_text: Callable[[Sequence[int]], list[str]], options: ProfileOptions) -> VocabProfile:
        special = sorted({int(i) for i in special_ids})
        if not special:
            raise ConfigError("vocabtailor: the tokenizer declares no special tokens (expected at least "
                              "end-of-sequence); a request could never stop")
        texts = None
        if options.scripts is not None:
            seen = sorted({int(t) for d in documents for t in d})
            texts = dict(zip(seen, token_text(seen)))
        chosen = static_set(documents, special, texts, options.min_doc_freq, options.tolerance, options.scripts)
        return VocabProfile(model=model.to_dict(), special_ids=special, static_ids=chosen.ids,
                            options=options.to_dict(), stats=chosen.stats)


METHOD = VocabTailor()

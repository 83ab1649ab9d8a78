"""Profiling input: the documents of a task corpus (text; the adapter tokenizes them).

``.jsonl`` files hold one JSON object per line; the document is its ``field`` (default: the first of
"output", "response", "completion", "text" present) — VocabTailor profiles what the task *produces*.
Other files are plain text; documents are separated by blank lines.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from overdrive.config import ConfigError

#: JSONL fields tried in order when ``--field`` is not given
FIELDS = ("output", "response", "completion", "text")


def read_documents(paths: Sequence[str | Path], field: str | None = None) -> list[str]:
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"--corpus {p}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"--corpus {p}: not UTF-8 text ({e})") from None
        if p.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--corpus {p}:{n}: not valid JSON ({e})") from None
                names = [field] if field else [f for f in FIELDS if isinstance(obj, dict) and f in obj]
                if not isinstance(obj, dict) or not names or names[0] not in obj or not isinstance(obj[names[0]], str):
                    want = repr(field) if field else " or ".join(repr(f) for f in FIELDS)
                    raise ConfigError(f"--corpus {p}:{n}: expected a JSON object with a string field {want}")
                docs.append(obj[names[0]])
        else:
            docs.extend(d.strip() for d in re.split(r"\n\s*\n", text) if d.strip())
    if not docs:
        raise ConfigError(f"--corpus {', '.join(map(str, paths))}: no documents found")
    return docs

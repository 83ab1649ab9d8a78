"""Progress bars for long work (calibration, quantization, fixture builds).

Bars go to stderr and show on a terminal; ``OVERDRIVE_PROGRESS=0`` hides them, ``=1`` forces them.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _disable() -> bool | None:
    v = os.environ.get("OVERDRIVE_PROGRESS", "").strip().lower()
    if v in ("0", "false", "no", "off"):
        return True
    if v in ("1", "true", "yes", "on"):
        return False
    return None  # tqdm: show on a TTY only


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=_disable(), dynamic_ncols=True)

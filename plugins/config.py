"""Base class for method configs: versioned dataclasses, validated on construction, JSON round-trip.

A method's config subclasses :class:`MethodConfig` as a ``@dataclass``; it sets ``VERSION`` (the
format version it writes) and may override :meth:`validate`. Unknown keys, a newer version than the
code understands, or a field of the wrong type are rejected with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

T = TypeVar("T", bound="MethodConfig")


class ConfigError(ValueError):
    """A config, plan or option is invalid. The message names the field and what was expected."""


@dataclasses.dataclass
class MethodConfig:
    """Base for every method config. Subclasses are dataclasses; ``version`` is always serialised."""

    VERSION: ClassVar[int] = 1
    version: int = 0  # 0 = "current": replaced by VERSION in __post_init__

    def __post_init__(self) -> None:
        if self.version == 0:
            self.version = self.VERSION
        if not isinstance(self.version, int) or isinstance(self.version, bool):
            raise ConfigError(f"{type(self).__name__}.version must be an int, got {self.version!r}")
        if self.version > self.VERSION:
            raise ConfigError(
                f"{type(self).__name__} version {self.version} is newer than this overdrive "
                f"understands (up to {self.VERSION}); upgrade overdrive"
            )
        self._check_types()
        self.validate()

    # -- hooks for subclasses -------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the offending field. Default: nothing to check."""

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **({"indent": 2} | kw))

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "config") -> T:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{source}: unknown option(s) {unknown} for {cls.__name__}; known: {sorted(names)}"
            )
        try:
            return cls(**dict(data))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # missing required fields
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls: type[T], text: str, *, source: str = "config") -> T:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike[str]) -> T:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such file (expected a {cls.__name__} JSON file)")
        return cls.from_json(p.read_text(), source=str(p))

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(Path(path), self.to_json() + "\n")

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    # -- internals ------------------------------------------------------------------------
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            expected = hints.get(f.name)
            value = getattr(self, f.name)
            if expected is None or not _matches(value, expected):
                if expected is not None:
                    raise ConfigError(
                        f"{type(self).__name__}.{f.name} must be {_type_name(expected)}, got {value!r}"
                    )


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike[str], missing: str) -> Any:
    """The parsed JSON of a file; ConfigError ``"{path}: {missing}"`` when it does not exist and naming
    the file when it is not valid JSON."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {missing}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None


def read_jsonl(path: Path, option: str = "--data") -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file; ConfigError naming
    ``path:line`` on invalid JSON, and naming ``option`` when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option} {path}: file not found")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from None
    return out

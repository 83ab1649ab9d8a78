"""vLLM attention backend classes for KV-cache methods (imported by vLLM from their qualified names).

Generic over the KV-cache contract: page cells sized from ``LayerKVFormat.cell_bytes``, kernel limits
from ``KVCacheMethod.paged_geometry()``, the query/key transform, attention and page writes from the
method; the full-precision sink/window store is kept and written here. Registration, plan lookup and
the store bookkeeping: :mod:`overdrive.adapters.vllm.kv_cache`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from overdrive.config import ConfigError
from overdrive.contracts.kv_cache import LayerKVFormat, PagedBatch, PagedGeometry

from overdrive.adapters._kv_cache import example_name, plan_env
from overdrive.adapters.vllm.kv_cache import (FullPrecisionStore, active_method, backend_class_name, backend_name, formats, kv_methods,
                            model_identity, store_geometry, tp_rank_size, write_fp_store)

log = logging.getLogger("overdrive")


def _no_plan() -> ConfigError:
    ex = example_name()
    return ConfigError("overdrive KV-cache attention backend selected without a plan: pass --additional-config "
                       f"'{{\"{ex}\": {{\"plan\": \"PLAN.json\"}}}}' or set {plan_env(ex)}=PLAN.json "
                       "(OVERDRIVE_<METHOD>_PLAN for another KV-cache method)")


# --------------------------------------------------------------------------------------- metadata
@dataclasses.dataclass
class OverdriveKVMetadata:
    num_actual_tokens: int
    batch: PagedBatch
    fp_capacity: int


class OverdriveKVBuilder(AttentionMetadataBuilder[OverdriveKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        active = active_method(vllm_config)
        if active is None:
            raise _no_plan()
        geo = store_geometry(formats(active, model_identity(vllm_config), *tp_rank_size()), active.source)
        self.store = FullPrecisionStore(kv_cache_spec.block_size, *geo) if geo is not None else None

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> OverdriveKVMetadata:
        m = common_attn_metadata
        qsl = m.query_start_loc_cpu.tolist()
        seq = m.seq_lens.cpu().tolist()
        qlens = [qsl[i + 1] - qsl[i] for i in range(m.num_reqs)]
        seq = seq[:m.num_reqs]
        dev = m.block_table_tensor.device
        prev = [s - q for s, q in zip(seq, qlens)]
        batch = PagedBatch(
            query_start_loc=m.query_start_loc[:m.num_reqs + 1],
            prev_lens=torch.tensor(prev, dtype=torch.int32, device=dev),
            block_table=m.block_table_tensor[:m.num_reqs],
            slot_mapping=m.slot_mapping[:m.num_actual_tokens],
            host_query_start_loc=qsl[:m.num_reqs + 1], host_prev_lens=prev)
        if self.store is None:
            return OverdriveKVMetadata(m.num_actual_tokens, batch, 0)
        bt_cpu = m.block_table_tensor[:m.num_reqs].cpu()
        st = self.store.step(seq, qlens, qsl, bt_cpu.tolist())
        batch.fp_block_table = self.store.block_table(bt_cpu).to(dev)
        batch.fp_from = torch.tensor(st["fp_from"], dtype=torch.int32, device=dev)
        batch.sink_ok = torch.tensor(st["sink_ok"], dtype=torch.int32, device=dev)
        batch.fp_write_index = torch.tensor(st["w_index"], dtype=torch.long, device=dev)
        batch.fp_write_slot = torch.tensor(st["w_slot"], dtype=torch.long, device=dev)
        return OverdriveKVMetadata(m.num_actual_tokens, batch, self.store.capacity)


# ---------------------------------------------------------------------------------------- the impl
class OverdriveKVImpl(AttentionImpl[OverdriveKVMetadata]):
    """Decoder self-attention over a KV-cache method's page cells (one instance per layer)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra: Any) -> None:
        self.vllm_config = get_current_vllm_config()
        self.active = active_method(self.vllm_config)
        if self.active is None:
            raise _no_plan()
        name = self.active.name
        unsupported = [what for what, bad in (
            (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
            ("ALiBi", alibi_slopes is not None), (f"sliding window {sliding_window}", sliding_window is not None),
            ("logit soft-capping", bool(logits_soft_cap)), ("KV sharing across layers", bool(kv_sharing_target_layer_name)),
            (f"--kv-cache-dtype {kv_cache_dtype}", kv_cache_dtype != "auto"),
            ("attention sinks", extra.get("sinks") is not None)) if bad]
        if unsupported:
            raise ConfigError(f"overdrive {name} attention backend does not support: {', '.join(unsupported)}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        self.attn_type = attn_type
        ident = model_identity(self.vllm_config)
        if head_size != ident.head_size:
            raise ConfigError(f"overdrive {name}: attention layer head size {head_size} differs from the model's "
                              f"{ident.head_size}")
        block = self.vllm_config.cache_config.block_size
        self.formats = formats(self.active, ident, *tp_rank_size())  # plan vs model checks (ConfigError)
        problems = self.active.method.paged_geometry().problems(head_size, block)
        if problems:
            raise ConfigError(f"overdrive {name} ({self.active.source}): " + "; ".join(problems))
        geo = store_geometry(self.formats, self.active.source)
        if geo is not None and geo[0] > block:
            raise ConfigError(f"overdrive {name}: {geo[0]} full-precision sink tokens do not fit one block of {block}")
        wrong = [f.layer for f in self.formats if f.num_kv_heads != self.num_kv_heads]
        if wrong:
            raise ConfigError(f"overdrive {name}: the plan gives {self.formats[wrong[0]].num_kv_heads} KV heads per "
                              f"rank (layer {wrong[0]}), the attention layers have {self.num_kv_heads}")
        self.fmt: LayerKVFormat | None = None
        self.layer_name: str | None = None
        self.fp_pool: torch.Tensor | None = None

    # -- per-layer binding -------------------------------------------------------------------------
    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        ctx = self.vllm_config.compilation_config.static_forward_context
        names = [n for n, layer in ctx.items() if getattr(layer, "impl", None) is self]
        if len(names) != 1:
            raise RuntimeError(f"overdrive KV backend: cannot find its attention layer (found {names})")
        self.layer_name = names[0]
        idx = extract_layer_index(self.layer_name)
        if not 0 <= idx < len(self.formats):
            raise ConfigError(f"overdrive {self.active.name}: layer {self.layer_name} (index {idx}) is not in the plan "
                              f"({len(self.formats)} layers)")
        self.fmt = self.formats[idx]
        # the layer's KV spec is sized from this layer's cell (per-layer attribute, not the class);
        # cell_bytes 0 keeps vLLM's dense cell
        ctx[self.layer_name].attn_backend = (cell_backend(self.active.name, self.fmt.cell_bytes) if self.fmt.cell_bytes
                                             else method_backend(self.active.name))

    def _pool(self, meta: OverdriveKVMetadata, like: torch.Tensor, block_size: int) -> torch.Tensor:
        need = meta.fp_capacity
        pool = self.fp_pool
        if pool is None or pool.shape[0] < need or pool.dtype != like.dtype:
            new = torch.zeros(max(need, 1), self.num_kv_heads, block_size, self.fmt.fp_store_channels,
                              dtype=like.dtype, device=like.device)
            if pool is not None and pool.dtype == like.dtype:
                new[:pool.shape[0]] = pool
            if self.fmt is not None and self.fmt.layer == 0:
                log.info("overdrive %s: full-precision sink/window store of layer 0 holds %d blocks (%.1f MiB per "
                         "layer)", self.active.name, new.shape[0], new.numel() * new.element_size() / 2**20)
            self.fp_pool = pool = new
        return pool

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: OverdriveKVMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("overdrive KV backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up without metadata
            return output
        if self.fmt is None:
            raise RuntimeError("overdrive KV backend: forward before process_weights_after_loading bound the layer")
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        method, fmt, batch = self.active.method, self.fmt, attn_metadata.batch
        q, k = method.transform_qk(fmt, q, k)
        pages = kv_cache.view(torch.uint8)  # (blocks, KV heads, block size, cell bytes)
        pool = (self._pool(attn_metadata, k, pages.shape[2])
                if fmt.uses_fp_store and batch.fp_block_table is not None else None)
        out = method.attend(fmt, pages, batch, q, k, v, self.scale, pool)
        method.store(fmt, pages, batch, k, v)
        if pool is not None:
            write_fp_store(pool, batch, k, v)
        output[:n] = out.view(output[:n].shape).to(output.dtype)
        return output


# ------------------------------------------------------------------------------------- backends
class OverdriveKVBackend(AttentionBackend):
    """Base of the per-method backends (``--attention-backend NAME``)."""

    method_name: ClassVar[str] = ""
    cell_bytes: ClassVar[int] = 0
    forward_includes_kv_cache_update = True
    accept_output_buffer = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @classmethod
    def geometry(cls) -> PagedGeometry:
        """The method's kernel limits (any, on the generic base class)."""
        if not cls.method_name:
            return PagedGeometry()
        import overdrive

        return overdrive.get_method(cls.method_name).load_impl().paged_geometry()

    @classmethod
    def get_supported_kernel_block_sizes(cls, kv_cache_spec=None) -> list:
        return [MultipleOf(cls.geometry().block_multiple)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(cls.geometry().head_sizes or [])  # empty: any (vLLM's convention)

    @classmethod
    def customize_spec(cls, spec):
        if cls.cell_bytes and spec.state_content_bytes is None:
            return dataclasses.replace(spec, state_content_bytes=cls.cell_bytes)
        return spec

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @staticmethod
    def get_impl_cls() -> type[OverdriveKVImpl]:
        return OverdriveKVImpl

    @staticmethod
    def get_builder_cls() -> type[OverdriveKVBuilder]:
        return OverdriveKVBuilder

    @staticmethod
    def get_name() -> str:  # overridden per method
        raise NotImplementedError


_classes: dict[str, type] = {}


def method_backend(method: str) -> type[OverdriveKVBackend]:
    """The backend class of one method (its name is the ``--attention-backend`` value)."""
    cls_name = backend_class_name(method)
    if cls_name not in _classes:
        name = backend_name(method)
        _classes[cls_name] = type(cls_name, (OverdriveKVBackend,), {
            "__module__": __name__, "__qualname__": cls_name, "method_name": method,
            "get_name": staticmethod(lambda: name)})
    return _classes[cls_name]


def cell_backend(method: str, cell_bytes: int) -> type[OverdriveKVBackend]:
    """Backend class for one cell size (layers of different widths get different page sizes)."""
    cls_name = backend_class_name(method, cell_bytes)
    if cls_name not in _classes:
        _classes[cls_name] = type(cls_name, (method_backend(method),), {
            "__module__": __name__, "__qualname__": cls_name, "cell_bytes": cell_bytes})
    return _classes[cls_name]


class OverdriveCPUAttentionBackend(CPUAttentionBackend):
    """Override of ``CPU_ATTN``: vLLM's CPU backend, except that layers go to the configured KV method."""

    @staticmethod
    def get_impl_cls() -> type:
        return OverdriveKVImpl if active_method(get_current_vllm_config_or_none()) is not None else CPUAttentionBackendImpl


def __getattr__(name: str) -> Any:
    # generated classes resolve by name (vLLM may import a backend class from its qualified name)
    if name in _classes:
        return _classes[name]
    for spec in kv_methods():
        base = backend_class_name(spec.name)
        if name == base:
            return method_backend(spec.name)
        if name.startswith(base + "_") and name.endswith("B") and name[len(base) + 1:-1].isdigit():
            return cell_backend(spec.name, int(name[len(base) + 1:-1]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



"""After overdrive's vLLM registration: a KV-cache method's backend by name in vLLM's registry and CLI, the
CPU_ATTN override, and a per-cell-size class resolved by name (vLLM imports backend classes by path).

    python vllm_kv_registry.py METHOD CELL_BYTES
"""
import sys

from vllm.config import AttentionConfig
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import overdrive.adapters.vllm.kv_backend as kb
from overdrive.adapters import vllm as adapter
from overdrive.adapters.vllm.kv_cache import backend_class_name
from overdrive.testing.probe import emit

method, cell_bytes = sys.argv[1], int(sys.argv[2])
adapter.register()
cls = AttentionBackendEnum[method.upper()].get_class()
cell = getattr(kb, backend_class_name(method, cell_bytes))
emit({"name": cls.get_name(), "cli": AttentionConfig(backend=method).backend.name,
      "cpu": AttentionBackendEnum.CPU_ATTN.get_path(), "cell_parent": cell.__mro__[1].__name__,
      "blocks": [str(x) for x in cls.get_supported_kernel_block_sizes()], "heads": cls.get_supported_head_sizes()[:3]})

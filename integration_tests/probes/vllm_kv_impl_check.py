"""Build the attention impl vLLM builds per attention layer at startup, for a KV-cache method and several
(model, block size, plan, head size) cases; emit "ok" or the ConfigError message per case.

    python vllm_kv_impl_check.py METHOD '[[label, model_dir, block_size, plan_path, head_size], ...]'
"""
import json
import os
import sys

from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config

from overdrive.adapters.vllm.kv_backend import OverdriveKVImpl
from overdrive.config import ConfigError
from overdrive.testing.probe import emit

method = sys.argv[1]
out = {}
for label, model, block, plan, head in json.loads(sys.argv[2]):
    os.environ[f"OVERDRIVE_{method.upper()}_PLAN"] = plan
    cfg = VllmConfig(model_config=ModelConfig(model=model, dtype="float32"), cache_config=CacheConfig(block_size=block))
    try:
        with set_current_vllm_config(cfg):
            OverdriveKVImpl(4, head, head ** -0.5, 2)  # 4 query heads, 2 KV heads: the tiny Llama's geometry
        out[label] = "ok"
    except ConfigError as e:
        out[label] = str(e)
emit(out)

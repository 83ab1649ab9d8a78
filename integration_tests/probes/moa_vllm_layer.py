"""Probe (``python moa_vllm_layer.py MODEL``): build the attention impl vLLM constructs for every layer of MODEL
with a KV-cache plan in ``OVERDRIVE_MOA_PLAN`` (what happens at startup, before any request) and emit the
ConfigError it raises, or ``{"error": null}``.

Run in a subprocess: vLLM's config context and plugin registration are process-wide.
"""
from __future__ import annotations

import sys

from overdrive.testing.probe import emit


def main(model: str) -> dict:
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config

    from overdrive.adapters.vllm.kv_backend import OverdriveKVImpl
    from overdrive.config import ConfigError

    cfg = VllmConfig(model_config=ModelConfig(model=model, dtype="float32"), cache_config=CacheConfig(block_size=32))
    hf = cfg.model_config.hf_config
    head = hf.hidden_size // hf.num_attention_heads
    try:
        with set_current_vllm_config(cfg):
            OverdriveKVImpl(hf.num_attention_heads, head, head ** -0.5, hf.num_key_value_heads)
    except ConfigError as e:
        return {"error": str(e)}
    return {"error": None}


if __name__ == "__main__":
    emit(main(sys.argv[1]))

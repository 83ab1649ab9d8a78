"""PM-KVQ: progressive mixed-precision KV-cache quantization (kind ``kv_cache_attention``)."""

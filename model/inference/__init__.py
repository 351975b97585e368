"""Inference: per-row KV cache (kv_cache.py) and the sampler (sampler.py)."""

"""Gemma 3 1B (Gemma Team 2025, arXiv 2503.19786): 26 layers, d 1152, 4 heads / 1 KV head of 256,
GeGLU 6912, QK-norm instead of soft-capping, 5 local (window 512) : 1 global, RoPE base 10k
local / 1M global, pre+post (1+scale) RMSNorm, tied 262,144-row embedding: 1.00B."""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=262_144, d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                   head_dim=256, mlp_dim=6912, activation='geglu', tie_embeddings=True,
                   scale_embeddings=True, norm_offset_one=True, post_norms=True, qk_norm=True,
                   layer_pattern='LLLLLG', sliding_window=512, rope_base=1_000_000.0,
                   rope_base_local=10_000.0, max_seq_len=32_768, dtype='bfloat16', remat='full')
  cfg.data.seq_len = 8192
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg

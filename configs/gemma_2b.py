"""Gemma 2B (Gemma Team 2024, arXiv 2402.08295): 18 layers, d 2048, 8 heads of 256, one KV head
(MQA), GeGLU with 16384 per branch, tied 256,128-row embedding scaled by sqrt(d): 2.51B.
(Gemma's RMSNorm (1+scale) parametrisation is a model-families issue; the count is the same.)"""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=256_128, d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                   head_dim=256, mlp_dim=16384, activation='geglu', block='serial',
                   tie_embeddings=True, scale_embeddings=True, max_seq_len=8192,
                   dtype='bfloat16', remat='full')
  cfg.data.seq_len = 8192
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg

"""Gemma 2 2B (Gemma Team 2024, arXiv 2408.00118): 26 layers, d 2304, 8 heads / 4 KV heads of
256, GeGLU 9216 per branch, pre+post RMSNorm with (1+scale), local(4096)/global alternation,
attention soft-cap 50, final soft-cap 30, tied sqrt(d)-scaled 256k embedding: 2.61B."""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=256_000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                   head_dim=256, mlp_dim=9216, activation='geglu', tie_embeddings=True,
                   scale_embeddings=True, norm_offset_one=True, post_norms=True,
                   attn_softcap=50.0, logit_softcap=30.0, layer_pattern='LG',
                   sliding_window=4096, max_seq_len=8192, dtype='bfloat16', remat='full')
  cfg.data.seq_len = 8192
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg

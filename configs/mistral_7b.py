"""Mistral 7B (Jiang et al. 2023, arXiv 2310.06825): 32 layers, d 4096, 32 heads / 8 KV heads of
128, SwiGLU 14336, untied 32k embeddings, sliding-window attention (4096) on every layer: 7.24B."""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   head_dim=128, mlp_dim=14336, activation='swiglu', tie_embeddings=False,
                   layer_pattern='L', sliding_window=4096, norm_eps=1e-5, max_seq_len=8192,
                   dtype='bfloat16', remat='full')
  cfg.data.seq_len = 8192
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg

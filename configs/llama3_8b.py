"""Llama 3 8B (Meta 2024): 32 layers, d 4096, 32 heads / 8 KV heads of 128 (GQA), SwiGLU 14336,
untied 128,256-row embeddings, RoPE base 500k with Llama 3.1 frequency scaling: 8.03B."""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=128_256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   head_dim=128, mlp_dim=14336, activation='swiglu', tie_embeddings=False,
                   rope_base=500_000.0, rope_scaling='llama3', rope_scaling_factor=8.0,
                   rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_len=8192, norm_eps=1e-5, max_seq_len=8192,
                   dtype='bfloat16', remat='full')
  cfg.data.seq_len = 8192
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg

"""A Llama-2-7B-like model (Touvron et al. 2023): 32 layers, d 4096, 32 heads of 128 (MHA),
SwiGLU 11008, untied 32k embeddings, RMSNorm, RoPE base 10k: 6.74B parameters."""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                   head_dim=128, mlp_dim=11008, activation='swiglu', block='serial',
                   tie_embeddings=False, norm_eps=1e-5, max_seq_len=4096, dtype='bfloat16',
                   remat='full')
  cfg.data.seq_len = 4096
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg

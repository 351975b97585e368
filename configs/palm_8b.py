"""PaLM 8B (Chowdhery et al. 2022, Table 1): 32 layers, d 4096, 16 heads of 256, multi-query,
SwiGLU with d_ff = 4 d, parallel blocks, shared 256k embedding, no biases: 8.63B parameters.
Reference shape: build abstractly (`model.transformer.abstract`), or train on a TPU pod."""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=256_000, d_model=4096, num_layers=32, num_heads=16, num_kv_heads=1,
                   head_dim=256, mlp_dim=16384, activation='swiglu', block='parallel',
                   tie_embeddings=True, max_seq_len=2048, dtype='bfloat16', remat='full')
  cfg.data.seq_len = 2048
  cfg.train.update(batch_size=256, z_loss=1e-4)
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg

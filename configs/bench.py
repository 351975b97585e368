"""Shapes for `launch.bench` (issue 12's side-by-side measurements), random tokens:

  python -m launch.bench --config=configs/bench.py           # 4 x d256 MQA SwiGLU, vocab 32000
  python -m launch.bench --config=configs/bench.py:nanogpt   # the same, shaped like nanoGPT's
                                                             # block: GELU, 4 KV heads, tied
Sequence 256, batch 8 (8 x 256 tokens per step).
"""
from configs.base import get_base


def get_config(shape: str = 'palm'):
  cfg = get_base()
  cfg.model.update(vocab_size=32000, d_model=256, num_layers=4, num_heads=4, num_kv_heads=1,
                   head_dim=64, mlp_dim=1024, max_seq_len=256, scan_layers=False)
  if shape == 'nanogpt':
    cfg.model.update(activation='gelu', num_kv_heads=4, tie_embeddings=True)
  elif shape != 'palm':
    raise ValueError(f"configs/bench.py:{shape}; expected 'palm' or 'nanogpt'")
  cfg.data.seq_len = 256
  cfg.train.update(batch_size=8, steps=1000, warmup_steps=100)
  return cfg

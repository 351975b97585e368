"""Tiny decoder for a laptop CPU: trains on the bundled stdlib corpus in minutes.

  python -m launch.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=1,
                   head_dim=64, mlp_dim=768, max_seq_len=256)
  cfg.data.seq_len = 256
  # ~1.2M tokens: about 11 minutes of training on 2 CPU cores (1.8k tokens/s).
  cfg.train.update(steps=300, batch_size=16, lr=3e-3, warmup_steps=50, eval_every=100,
                   checkpoint_every=100)
  return cfg

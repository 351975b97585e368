"""A ~110M-parameter decoder for one GPU (bfloat16 compute, PaLM-style parallel blocks).

  python -m launch.main --config=configs/small.py --workdir=/tmp/small
"""
from configs.base import get_base


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=32768, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                   head_dim=64, mlp_dim=3072, block='parallel', max_seq_len=1024,
                   dtype='bfloat16', remat='dots')
  cfg.data.seq_len = 1024
  cfg.data.tokenizer.train_bytes = 16_000_000
  cfg.train.update(steps=20_000, batch_size=32, lr=1e-3, warmup_steps=1000, eval_every=1000,
                   checkpoint_every=1000)
  return cfg

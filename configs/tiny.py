"""Tiny decoder for a laptop CPU: trains on the bundled stdlib corpus in minutes (the README's
first command; its recipe and the experiments behind it are in the README's quickstart log).

  python -m launch.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
from configs.base import get_base


def get_config():
  cfg = get_base()
  # Unrolled layers: 4 small layers run faster without the scan's dynamic slices on CPU.
  cfg.model.update(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=1,
                   head_dim=64, mlp_dim=768, max_seq_len=256, scan_layers=False)
  cfg.data.seq_len = 256
  # ~1.1M tokens in about 12.5 minutes of training on 2 CPU cores. Muon on the hidden matrices
  # (0.079 bits/byte better than AdamW at the same 300 steps), a short warmup, decay to zero,
  # no weight decay (a 270-step run sees 1.1M of the 8M tokens once).
  cfg.train.update(steps=270, batch_size=16, optimizer='muon', muon_lr=0.04, lr=6e-3,
                   warmup_steps=30, lr_end_fraction=0.0, weight_decay=0.0, eval_every=90,
                   checkpoint_every=90)
  return cfg

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
  # ~1.5M tokens in about 16.5 minutes of training on 2 CPU cores. Muon on the hidden matrices
  # (0.105 bits/byte below AdamW at step 100 of the same schedule), a short warmup, decay to 0,
  # no weight decay (a 360-step run sees 1.5M of the 8M tokens once).
  cfg.train.update(steps=360, batch_size=16, optimizer='muon', muon_lr=0.04, lr=6e-3,
                   warmup_steps=30, lr_end_fraction=0.0, weight_decay=0.0, eval_every=120,
                   checkpoint_every=120)
  return cfg

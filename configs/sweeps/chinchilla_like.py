"""Reference TPU-scale plan shaped like Chinchilla's IsoFLOP sweep (Hoffmann et al. 2022, §3.2):
9 budgets from 6e18 to 3e21 FLOPs, 7 sizes each around ~20 tokens per parameter, cosine to 10%
over each run's own length, batch growing with compute (DeepSeek LLM 2024 fit B_opt ∝ C^0.327).

  python -m launch.sweep --config=configs/sweeps/chinchilla_like.py --workdir=gs://.../sweep \
      --plan_only                 # the table
  python -m launch.sweep ... --submit=print   # one launch.main command per point, for a TPU VM
"""
from configs.base import get_base
from configs.sweeps.cpu import get_sweep_defaults


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=32_000, max_seq_len=2048, num_kv_heads=1, dtype='bfloat16',
                   remat='dots', block='parallel')
  cfg.data.seq_len = 2048
  cfg.data.tokenizer.train_bytes = 100_000_000
  cfg.train.update(batch_size=256, lr=2e-4, eval_batches=64, tensorboard=True)
  cfg.mesh.update(data=1, fsdp=-1)
  cfg.sweep = get_sweep_defaults()
  cfg.sweep.update(
      budgets='logspace:6e18:3e21:9',
      # (d_model, num_layers): depth grows with width (aspect ratio ~64-128, like Chinchilla Table A9).
      ladder=((512, 8), (640, 10), (768, 12), (896, 14), (1024, 16), (1280, 16), (1536, 18),
              (1792, 20), (2048, 22), (2304, 24), (2560, 26), (3072, 28), (3584, 30), (4096, 32),
              (4608, 36), (5120, 40), (6144, 44), (7168, 48)),
      head_dim=128, kv_heads=0, mlp_ratio=8 / 3, mlp_multiple=128,
      sizes_per_budget=7, rung_stride=1, tokens_per_param=20.0,
      batch_rule='power', batch_exponent=0.3, batch_multiple=64,
      lr_width_exponent=0.5, lr_reference_width=1024,   # Chinchilla: 2e-4 small -> 1.25e-4 large.
      warmup_fraction=0.02, min_steps=1000, bootstrap=1000)
  return cfg

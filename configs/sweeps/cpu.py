"""A Chinchilla-style IsoFLOP sweep small enough for 2 CPU cores: 3 budgets x 5 sizes on the
bundled stdlib corpus, about 20 minutes on a quiet 2-core machine (the plan prints an estimate).

  python -m launch.sweep --config=configs/sweeps/cpu.py --workdir=runs/sweep_cpu [--plan_only]

Each point is an ordinary palmax run (train/trainer.py) in WORKDIR/points/NAME; WORKDIR gets
results.csv/json, fits.json, the plots and report.md. Budgets span one decade (1.5e11-1.35e12
FLOPs); models are 2-layer decoders 15k-270k parameters wide (d 16-96) with a 512-token
vocabulary, so embeddings are a large share of N at this scale. In a pilot at 1.5e11 FLOPs the
loss was lowest at 26k-42k parameters (10-25 tokens per parameter), inside the planned window.
"""
import ml_collections

from configs.base import get_base


def get_sweep_defaults() -> ml_collections.ConfigDict:
  """Every config.sweep field with its default (see train/scaling/plan.py)."""
  return ml_collections.ConfigDict(dict(
      # FLOPs: 'C1,C2,...' or 'logspace:LO:HI:COUNT' (a string, so the command line can say either).
      budgets='logspace:1e12:1e14:3',
      ladder=((64, 2), (128, 4), (256, 4), (512, 8), (1024, 16)),
      head_dim=64, kv_heads=0, mlp_ratio=8 / 3, mlp_multiple=8,
      sizes_per_budget=5, rung_stride=1, tokens_per_param=20.0,
      batch_rule='fixed', batch_exponent=0.0, batch_multiple=8,
      lr_width_exponent=0.0, lr_reference_width=128,
      warmup_fraction=0.05, min_steps=20, log_points=40,
      fit_loss='eval_loss',       # eval_loss | train_loss: the loss approaches 2 and 3 fit.
      bootstrap=200, seed=0,      # Bootstrap resamples for the confidence intervals.
      flops_per_s=0.0, overhead_s=0.0,  # Only for the plan's time estimate (0 = none).
      retry_failed=False,         # Also via --retry_failed.
      point='',                   # Set by the per-point command lines of --submit=print.
  ))


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=512, max_seq_len=128)
  cfg.data.seq_len = 128
  cfg.data.tokenizer.train_bytes = 4_000_000
  cfg.train.update(batch_size=16, lr=3e-3, eval_batches=32, peak_flops=1e11, tensorboard=False,
                   async_checkpoints=False, keep_checkpoints=1)
  cfg.sweep = get_sweep_defaults()
  cfg.sweep.update(
      budgets='1.5e11,4.5e11,1.35e12',
      # Two layers throughout, N ~1.6-2x apart: one smooth family (changing depth along the
      # ladder made the IsoFLOP curves bumpy in a pilot: at these sizes 1 vs 2 layers matters
      # more than width).
      ladder=tuple((d, 2) for d in (16, 24, 32, 48, 64, 96, 128, 192)),
      head_dim=8, kv_heads=0, sizes_per_budget=5, rung_stride=1, tokens_per_param=20.0,
      min_steps=40, flops_per_s=1.2e10, overhead_s=20.0)
  return cfg

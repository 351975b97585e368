"""AdamW with linear warmup and cosine decay to a fraction of the peak, plus global-norm clipping."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           end_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps`, then cosine to `end_fraction * peak` at
  `total_steps` (Chinchilla: decaying to 10% of peak over the run's own length)."""
  warmup_steps = max(1, min(warmup_steps, total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * end_fraction)


def make_optimizer(train_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """From `cfg.train`: lr, warmup_steps, lr_end_fraction, b1, b2, eps, weight_decay, clip_norm."""
  schedule = learning_rate_schedule(train_cfg.lr, train_cfg.warmup_steps, total_steps,
                                    train_cfg.lr_end_fraction)

  def decay_mask(params):
    # Stacked layer params (under 'stack{j}') carry a leading layers axis: a stacked norm scale
    # is [R, D]. Matrices are decayed; norms, biases and buffers are not.
    def stacked(path):
      return any(str(getattr(k, 'key', '')).startswith('stack') for k in path)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim - (1 if stacked(path) else 0) > 1, params)

  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.clip_norm) if train_cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask),
  )
  return tx, schedule

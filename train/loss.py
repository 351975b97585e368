"""Next-token cross-entropy with optional z-loss, in float32, with per-token weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None = None,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Weighted mean of -log p(target), plus z_loss * log(Z)^2 (PaLM §5 uses 1e-4) to keep the
  softmax normaliser near 1. Returns (total_loss, {'loss': ce, 'z_loss': ..., 'weight': sum w})."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  if weights_BT is None:
    weights_BT = jnp.ones(targets_BT.shape, jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  denom = jnp.maximum(weights_BT.sum(), 1.0)
  ce = (nll_BT * weights_BT).sum() / denom
  zl = (jnp.square(log_z_BT) * weights_BT).sum() / denom
  return ce + z_loss * zl, {'loss': ce, 'z_loss': zl, 'weight': weights_BT.sum()}

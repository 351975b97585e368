"""Per-token log-probabilities and entropies of targets, the quantities preference and RL
objectives are written in.

    logp_BT, entropy_BT = token_logps(logits_BTV, targets_BT, mask_BT)
    seq_B = sequence_logps(logp_BT, mask_BT)            # sum over the completion's tokens

Computed in float32 from materialised logits (these objectives need the per-token values, not
only a mean); masked-out targets may hold any id (a soft prompt's virtual token, padding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits_BTV: jax.Array, targets_BT: jax.Array,
                mask_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(log p(target) [B, T], entropy of the predicted distribution [B, T]), both float32 and 0
  where `mask_BT` is 0."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  if mask_BT is None:
    mask_BT = jnp.ones(targets_BT.shape, jnp.float32)
  targets_BT = jnp.where(mask_BT > 0, targets_BT, 0)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
  return logp_BT * mask_BT, entropy_BT * mask_BT


def sequence_logps(logp_BT: jax.Array, mask_BT: jax.Array, average: bool = False) -> jax.Array:
  """[B]: the sum of each row's masked per-token log-probs, or their mean (`average`)."""
  total_B = jnp.sum(logp_BT * mask_BT, axis=1)
  if average:
    return total_B / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)
  return total_B

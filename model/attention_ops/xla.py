"""The reference backend: einsum -> float32 softmax -> einsum, materialising [B, K, G, T, S]."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.attention_ops.mask import MASK_VALUE, AttentionMask


def attend(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, softcap: float = 0.0):
  """Softmax attention (float32 softmax); queries arrive already scaled. -> y_BTNH."""
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  dtype = q_BTNH.dtype
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  logits_BKGTS = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH, k_BSKH.astype(dtype),
                            preferred_element_type=jnp.float32)
  if softcap:
    logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
  logits_BKGTS = jnp.where(mask.allowed()[:, None, None], logits_BKGTS, MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dtype)
  y_BTKGH = jnp.einsum('bkgts,bskh->btkgh', probs_BKGTS, v_BSKH.astype(dtype),
                       preferred_element_type=jnp.float32).astype(dtype)
  return y_BTKGH.reshape(b, t, n, h)

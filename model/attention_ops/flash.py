"""Blockwise attention in pure JAX (FlashAttention's online softmax, Dao et al. 2022): keys are
visited in blocks of `BLOCK` with a running max and sum, so memory is [B, K, G, T, BLOCK] instead
of [..., S]. Each block's step is rematerialised in the backward pass, so gradients stay linear in
S too. Matches 'xla' to float32 rounding."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.attention_ops.mask import MASK_VALUE, AttentionMask

BLOCK = 512


def attend(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, softcap: float = 0.0,
           block: int = BLOCK):
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  dtype = q_BTNH.dtype
  block = min(block, s)
  nblocks = -(-s // block)
  pad = nblocks * block - s
  mask = mask.padded(s + pad)
  if pad:
    k_BSKH = jnp.pad(k_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v_BSKH = jnp.pad(v_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  k_nBCKH = k_BSKH.reshape(b, nblocks, block, kv, h).swapaxes(0, 1)
  v_nBCKH = v_BSKH.reshape(b, nblocks, block, kv, h).swapaxes(0, 1)

  @jax.checkpoint
  def step(carry, xs):
    m_BKGT, l_BKGT, acc_BKGTH = carry
    i, k_BCKH, v_BCKH = xs
    logits_BKGTC = jnp.einsum('btkgh,bckh->bkgtc', q_BTKGH, k_BCKH.astype(dtype),
                              preferred_element_type=jnp.float32)
    if softcap:
      logits_BKGTC = softcap * jnp.tanh(logits_BKGTC / softcap)
    ok_BTC = mask.allowed(i * block, block)
    logits_BKGTC = jnp.where(ok_BTC[:, None, None], logits_BKGTC, MASK_VALUE)
    m_new = jnp.maximum(m_BKGT, logits_BKGTC.max(-1))
    p_BKGTC = jnp.exp(logits_BKGTC - m_new[..., None])
    alpha = jnp.exp(m_BKGT - m_new)
    l_new = alpha * l_BKGT + p_BKGTC.sum(-1)
    acc = alpha[..., None] * acc_BKGTH + jnp.einsum(
        'bkgtc,bckh->bkgth', p_BKGTC.astype(dtype), v_BCKH.astype(dtype),
        preferred_element_type=jnp.float32)
    return (m_new, l_new, acc), None

  g = n // kv
  init = (jnp.full((b, kv, g, t), MASK_VALUE, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
          jnp.zeros((b, kv, g, t, h), jnp.float32))
  (_, l_BKGT, acc_BKGTH), _ = jax.lax.scan(step, init, (jnp.arange(nblocks), k_nBCKH, v_nBCKH))
  y_BKGTH = acc_BKGTH / l_BKGT[..., None]
  return jnp.einsum('bkgth->btkgh', y_BKGTH).reshape(b, t, n, h).astype(dtype)

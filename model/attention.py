"""Causal self-attention with multi-head, grouped-query and multi-query variants and a KV cache.

Shapes: B batch, T query length, S key length (T in training, the cache size in decoding),
D d_model, N query heads, K kv heads (N % K == 0, G = N // K queries per kv head), H head_dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import sharding
from model.config import ModelConfig
from model.layers import fan_in_init, matmul, param, rope

# Large negative instead of -inf so fully-masked rows (never produced here) stay finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

KVCache = dict  # {'k': [B, S, K, H], 'v': [B, S, K, H]} for one layer.


class Attention(nnx.Module):
  """x_BTD -> y_BTD. With `cache`, writes this step's K/V at `index` and attends to the cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_q = param(rngs, fan_in_init([0]), (d, n, h), ('embed', 'heads', 'head_dim'), pdt)
    self.w_k = param(rngs, fan_in_init([0]), (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.w_v = param(rngs, fan_in_init([0]), (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.w_o = param(rngs, fan_in_init([0, 1]), (n, h, d), ('heads', 'head_dim', 'embed'), pdt)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               cache: KVCache | None = None, index: jax.Array | int = 0):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    q_BTNH = matmul('btd,dnh->btnh', x_BTD, self.w_q[...], dtype)
    k_BTKH = matmul('btd,dkh->btkh', x_BTD, self.w_k[...], dtype)
    v_BTKH = matmul('btd,dkh->btkh', x_BTD, self.w_v[...], dtype)
    q_BTNH = rope(q_BTNH, positions_BT, cfg.rope_base)
    k_BTKH = rope(k_BTKH, positions_BT, cfg.rope_base)
    q_BTNH = sharding.constrain(q_BTNH, ('batch', 'length', 'act_heads', None))

    if cache is None:
      k_BSKH, v_BSKH, k_pos_S = k_BTKH, v_BTKH, positions_BT[0]
      new_cache = None
    else:
      # Cache slot s holds the key at absolute position s (all rows share positions).
      start = (0, index, 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(cache['k'], k_BTKH.astype(cache['k'].dtype), start)
      v_BSKH = jax.lax.dynamic_update_slice(cache['v'], v_BTKH.astype(cache['v'].dtype), start)
      k_pos_S = jnp.arange(k_BSKH.shape[1])
      new_cache = {'k': k_BSKH, 'v': v_BSKH}

    y_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, positions_BT, k_pos_S)
    y_BTD = matmul('btnh,nhd->btd', y_BTNH, self.w_o[...], dtype)
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed')), new_cache


def attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_S):
  """Causal softmax attention (float32 softmax); a query sees keys at positions <= its own.

  Unfilled cache slots lie at positions beyond every query, so the causal mask hides them.
  """
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  dtype = q_BTNH.dtype
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h) * jnp.asarray(h ** -0.5, dtype)
  logits_BKGTS = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH, k_BSKH.astype(dtype),
                            preferred_element_type=jnp.float32)
  mask_BTS = k_pos_S[None, None, :] <= q_pos_BT[:, :, None]
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dtype)
  y_BTKGH = jnp.einsum('bkgts,bskh->btkgh', probs_BKGTS, v_BSKH.astype(dtype),
                       preferred_element_type=jnp.float32).astype(dtype)
  return y_BTKGH.reshape(b, t, n, h)

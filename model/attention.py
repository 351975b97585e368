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
from model.layers import RMSNorm, fan_in_init, matmul, param, rope, rope_inv_freq

# Large negative instead of -inf so fully-masked rows (never produced here) stay finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

KVCache = dict  # {'k': [B, S, K, H], 'v': [B, S, K, H]} for one layer.


class Attention(nnx.Module):
  """x_BTD -> y_BTD. With `cache`, writes this step's K/V at `index` and attends to the cache.

  `window` > 0 makes the layer local (sliding window; Mistral, Gemma 2/3), `rope_base`
  overrides cfg.rope_base and `rope_scaled` says whether cfg.rope_scaling applies (global
  layers); all may be traced per-layer scalars from the scanned stack.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_q = param(rngs, fan_in_init([0]), (d, n, h), ('embed', 'heads', 'head_dim'), pdt)
    self.w_k = param(rngs, fan_in_init([0]), (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.w_v = param(rngs, fan_in_init([0]), (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.w_o = param(rngs, fan_in_init([0, 1]), (n, h, d), ('heads', 'head_dim', 'embed'), pdt)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg, rngs, dim=h, name='head_dim')
      self.k_norm = RMSNorm(cfg, rngs, dim=h, name='head_dim')

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               cache: KVCache | None = None, index: jax.Array | int = 0,
               window: jax.Array | int = 0, rope_base: jax.Array | float | None = None,
               rope_scaled: jax.Array | bool = True):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    q_BTNH = matmul('btd,dnh->btnh', x_BTD, self.w_q[...], dtype)
    k_BTKH = matmul('btd,dkh->btkh', x_BTD, self.w_k[...], dtype)
    v_BTKH = matmul('btd,dkh->btkh', x_BTD, self.w_v[...], dtype)
    if cfg.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    inv_freq_K = rope_inv_freq(cfg.head_dim, cfg.rope_base if rope_base is None else rope_base, cfg,
                               rope_scaled)
    q_BTNH = rope(q_BTNH, positions_BT, inv_freq_K)
    k_BTKH = rope(k_BTKH, positions_BT, inv_freq_K)
    q_BTNH = q_BTNH * jnp.asarray((cfg.query_scale_dim or cfg.head_dim) ** -0.5, dtype)
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

    y_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, positions_BT, k_pos_S, window, cfg.attn_softcap)
    y_BTD = matmul('btnh,nhd->btd', y_BTNH, self.w_o[...], dtype)
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed')), new_cache


def attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_S, window=0, softcap: float = 0.0):
  """Causal softmax attention (float32 softmax); queries arrive already scaled.

  A query sees keys at positions <= its own and, when `window` > 0, > its own - window.
  Unfilled cache slots lie at positions beyond every query, so the causal mask hides them.
  """
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  dtype = q_BTNH.dtype
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  logits_BKGTS = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH, k_BSKH.astype(dtype),
                            preferred_element_type=jnp.float32)
  if softcap:
    logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
  k_pos_11S, q_pos_BT1 = k_pos_S[None, None, :], q_pos_BT[:, :, None]
  mask_BTS = (k_pos_11S <= q_pos_BT1) & ((window <= 0) | (k_pos_11S > q_pos_BT1 - window))
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dtype)
  y_BTKGH = jnp.einsum('bkgts,bskh->btkgh', probs_BKGTS, v_BSKH.astype(dtype),
                       preferred_element_type=jnp.float32).astype(dtype)
  return y_BTKGH.reshape(b, t, n, h)

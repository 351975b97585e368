"""Causal self-attention with multi-head, grouped-query and multi-query variants and a KV cache.

The layer projects and rotates q/k/v, describes what each query may see once
(`attention_ops.AttentionMask`: causal, sliding window, segment ids, per-row cache lengths) and
hands both to the backend `config.model.attention_impl` picks (model/attention_ops/).
Shapes: B batch, T query length, S key length (T in training, the cache size in decoding),
D d_model, N query heads, K kv heads (N % K == 0, G = N // K queries per kv head), H head_dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention_ops, sharding
from model.attention_ops.mask import AttentionMask
from model.config import ModelConfig
from model.inference.kv_cache import LayerCache
from model.layers import RMSNorm, fan_in_init, linear, rope, rope_inv_freq

KVCache = LayerCache  # One layer's {'k', 'v'}: [B, S, K, H] each.


class Attention(nnx.Module):
  """x_BTD -> (y_BTD, cache). With `cache` (a LayerCache from `init_cache`), row b writes this
  step's K/V at slots index[b]..index[b]+T-1 (`index` a scalar or [B]) and attends to its slots
  below index[b]+T; `positions_BT` must then be the slot numbers (absolute positions).

  `window` > 0 makes the layer local (sliding window; Mistral, Gemma 2/3), `rope_base`
  overrides cfg.rope_base and `rope_scaled` says whether cfg.rope_scaling applies (global
  layers); all may be traced per-layer scalars from the scanned stack. `segment_ids_BT`
  (training forward only) keeps packed documents apart.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_q = linear(rngs, fan_in_init([0]), (d, n, h), ('embed', 'heads', 'head_dim'), pdt,
                      'btd,dnh->btnh')
    self.w_k = linear(rngs, fan_in_init([0]), (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt,
                      'btd,dkh->btkh')
    self.w_v = linear(rngs, fan_in_init([0]), (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt,
                      'btd,dkh->btkh')
    self.w_o = linear(rngs, fan_in_init([0, 1]), (n, h, d), ('heads', 'head_dim', 'embed'), pdt,
                      'btnh,nhd->btd')
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg, rngs, dim=h, name='head_dim')
      self.k_norm = RMSNorm(cfg, rngs, dim=h, name='head_dim')

  def init_cache(self, batch: int, size: int) -> LayerCache:
    """This layer's empty cache: k, v [batch, size, K, H] in the compute dtype (the place for a
    quantized int8 cache)."""
    cfg = self.cfg
    return LayerCache.zeros(batch, size, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype))

  @jax.named_scope('attention')
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               cache: LayerCache | None = None, index: jax.Array | int = 0,
               window: jax.Array | int = 0, rope_base: jax.Array | float | None = None,
               rope_scaled: jax.Array | bool = True, segment_ids_BT: jax.Array | None = None):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    q_BTNH = self.w_q.apply(x_BTD, dtype)
    k_BTKH = self.w_k.apply(x_BTD, dtype)
    v_BTKH = self.w_v.apply(x_BTD, dtype)
    if cfg.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    inv_freq_K = rope_inv_freq(cfg.head_dim, cfg.rope_base if rope_base is None else rope_base, cfg,
                               rope_scaled)
    q_BTNH = rope(q_BTNH, positions_BT, inv_freq_K)
    k_BTKH = rope(k_BTKH, positions_BT, inv_freq_K)
    q_BTNH = q_BTNH * jnp.asarray((cfg.query_scale_dim or cfg.head_dim) ** -0.5, dtype)
    q_BTNH = sharding.constrain(q_BTNH, ('batch', 'length', 'act_heads', None))

    if cache is None:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
      mask = attention_ops.causal(positions_BT, window, segment_ids_BT)
      new_cache = None
    else:
      if segment_ids_BT is not None:
        raise ValueError('segment ids apply to the forward without a KV cache (packed training '
                         'rows); a cache row is one sequence')
      if isinstance(cache, dict):
        cache = LayerCache(cache['k'], cache['v'])
      b, t = x_BTD.shape[:2]
      start_B = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (b,))
      # A dense LayerCache or a paged one (model/inference/paged_cache.py): both write the new
      # keys at each row's positions and read back [B, S, K, H] with slot s = position s.
      new_cache = cache.write(k_BTKH, v_BTKH, start_B)
      k_BSKH, v_BSKH = new_cache.keys_values()
      # Slot s holds position s; a row sees its slots below start + T.
      mask = AttentionMask(positions_BT, jnp.arange(k_BSKH.shape[1], dtype=jnp.int32)[None],
                           window, kv_lengths_B=start_B + t)

    y_BTNH = attention_ops.get(cfg.attention_impl)(q_BTNH, k_BSKH, v_BSKH, mask,
                                                   cfg.attn_softcap)
    y_BTD = self.w_o.apply(y_BTNH, dtype)
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed')), new_cache


def attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_S, window=0, softcap: float = 0.0,
           impl: str = 'xla'):
  """Causal softmax attention on explicit positions (queries already scaled): the mask
  description for `k_pos_S` shared by all rows, run by backend `impl`."""
  k_pos_1S = jnp.asarray(k_pos_S)[None]
  mask = AttentionMask(q_pos_BT, k_pos_1S, window)
  return attention_ops.get(impl)(q_BTNH, k_BSKH, v_BSKH, mask, softcap)

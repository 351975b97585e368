"""Per-row KV cache. Each attention layer makes its own `LayerCache` (`Attention.init_cache`);
`Decoder.init_cache` stacks them like the layers and adds one length per row.

Row b's key for position s lives in slot s; slots >= lengths_B[b] are free (whatever they hold
is masked). A forward with the cache writes row b's T new keys at slots lengths_B[b].. and
advances lengths_B[b] by T, so rows of different lengths prefill and decode together. Shapes:
B batch, S cache size, K kv heads, H head_dim, R a stack's repeats.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model import sharding

# Logical axis names of one layer's k / v (model/sharding.py maps them to mesh axes): the cache
# shards like the attention activations.
CACHE_NAMES = ('batch', 'cache_length', 'act_kv_heads', None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One attention layer's keys and values, [B, S, K, H] (or [R, B, S, K, H] when stacked)."""
  k: jax.Array
  v: jax.Array

  @property
  def size(self) -> int:
    return self.k.shape[-3]

  @classmethod
  def zeros(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> 'LayerCache':
    shape = (batch, size, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def write(self, k_BTKH, v_BTKH, start_B) -> 'LayerCache':
    """Row b's T keys/values at slots start_B[b]..start_B[b]+T-1 (the caller keeps them inside
    the cache: dynamic_update_slice clamps an overflowing start)."""
    put = jax.vmap(lambda c_SKH, x_TKH, i: jax.lax.dynamic_update_slice_in_dim(c_SKH, x_TKH, i, 0))
    return LayerCache(sharding.constrain(put(self.k, k_BTKH.astype(self.k.dtype), start_B),
                                         CACHE_NAMES),
                      sharding.constrain(put(self.v, v_BTKH.astype(self.v.dtype), start_B),
                                         CACHE_NAMES))

  def keys_values(self) -> tuple[jax.Array, jax.Array]:
    """k_BSKH, v_BSKH: slot s holds position s (the attention layer masks slots >= length)."""
    return self.k, self.v

  def __getitem__(self, key):  # Old dict-style access: cache['k'].
    return getattr(self, key)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
  """The model's cache: `layers` mirrors the stacks ({'stack{j}': {'block{p}': LayerCache}}, each
  [R, B, S, K, H]) and `lengths_B` int32 counts each row's filled slots."""
  layers: dict
  lengths_B: jax.Array

  @property
  def size(self) -> int:
    """Slots per row (a paged cache: pages per row x page size)."""
    first = jax.tree.leaves(self.layers, is_leaf=lambda x: hasattr(x, 'keys_values'))[0]
    return first.size if hasattr(first, 'size') else first.shape[2]

  def with_lengths(self, lengths_B) -> 'DecodeCache':
    """The same keys with new row lengths: e.g. after prefilling right-padded prompts, the true
    prompt lengths (the pad keys become free slots)."""
    return DecodeCache(self.layers, jnp.asarray(lengths_B, jnp.int32).reshape(self.lengths_B.shape))

  def __getitem__(self, key):  # Old dict-style access: cache['stack0'].
    return self.layers[key]

  def logical_names(self) -> 'DecodeCache':
    """The same tree with each array's logical axis names (for shardings of a served cache)."""
    return DecodeCache(jax.tree.map(lambda _: ('layers',) + CACHE_NAMES, self.layers),
                       ('batch',))

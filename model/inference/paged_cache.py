"""Paged KV cache: keys and values live in a pool of fixed-size pages, and each row owns a page
table saying which pages hold its positions (vLLM's PagedAttention layout, Levanter's page table).

Row b's position p lives in page `page_table_BM[b, p // page_size]` at offset `p % page_size`.
Page 0 is the null page: never handed out, it absorbs the writes of padding tokens and idle
rows, and unused table entries point at it (whatever it holds is masked by the row lengths).

Attention reads through the table with a gather ([B, M * page_size, K, H], slot s = position s),
so the attention layer and every backend see the same layout as the dense cache; a ragged
paged-attention kernel for TPU/GPU can replace `keys_values` without touching the layer.
Shapes: P pages, Z page size, B rows, M pages per row (max_seq_len / Z), K kv heads, H head_dim,
R a stack's repeats.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model import sharding
from model.inference.kv_cache import CACHE_NAMES, DecodeCache

NULL_PAGE = 0
# Logical axis names (model/sharding.py maps them): pages shard over kv heads like the
# attention activations; tables are small and replicated.
PAGE_NAMES = (None, None, 'act_kv_heads', None)
TABLE_NAMES = (None, None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLayerCache:
  """One attention layer's pages k_pages / v_pages [P, Z, K, H] and the rows' tables [B, M]."""
  k_pages: jax.Array
  v_pages: jax.Array
  page_table_BM: jax.Array

  @property
  def page_size(self) -> int:
    return self.k_pages.shape[-3]

  @property
  def size(self) -> int:
    """Positions a row can address: M pages x Z."""
    return self.page_table_BM.shape[-1] * self.page_size

  def write(self, k_BTKH, v_BTKH, start_B) -> 'PagedLayerCache':
    """Row b's T keys/values at positions start_B[b].. (positions past the table go to the
    null page, like idle rows' and padding tokens' writes)."""
    z, m = self.page_size, self.page_table_BM.shape[-1]
    pos_BT = start_B[:, None] + jnp.arange(k_BTKH.shape[1], dtype=jnp.int32)[None]
    page_BT = jnp.take_along_axis(self.page_table_BM, jnp.clip(pos_BT // z, 0, m - 1), axis=1)
    page_BT = jnp.where(pos_BT < m * z, page_BT, NULL_PAGE)
    off_BT = pos_BT % z
    put = lambda pages, x: sharding.constrain(
        pages.at[page_BT, off_BT].set(x.astype(pages.dtype), mode='drop'), PAGE_NAMES)
    return PagedLayerCache(put(self.k_pages, k_BTKH), put(self.v_pages, v_BTKH),
                           self.page_table_BM)

  def keys_values(self) -> tuple[jax.Array, jax.Array]:
    """k_BSKH, v_BSKH gathered through the table, S = M * Z (slot s = position s)."""
    b, m = self.page_table_BM.shape
    read = lambda pages: sharding.constrain(
        pages[self.page_table_BM].reshape((b, m * self.page_size) + pages.shape[-2:]),
        CACHE_NAMES)
    return read(self.k_pages), read(self.v_pages)


def init_pools(cfg, num_pages: int, page_size: int) -> dict:
  """Empty pools mirroring the layer stacks: {'stack{j}': {'block{p}': (k, v)}}, each
  [R, P, Z, K, H] in the compute dtype."""
  shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
  pools = {}
  for j, (repeats, unit) in enumerate(cfg.layer_groups()):
    zeros = lambda: jnp.zeros((repeats,) + shape, jnp.dtype(cfg.dtype))
    pools[f'stack{j}'] = {f'block{p}': (zeros(), zeros()) for p in range(len(unit))}
  return pools


def as_cache(pools: dict, page_table_BM: jax.Array, lengths_B: jax.Array) -> DecodeCache:
  """The model's DecodeCache over the pools: every layer reads the same tables (broadcast over
  a stack's repeats so the layer scan slices them like the pages)."""
  def layer(kv):
    k, v = kv
    table = jnp.broadcast_to(page_table_BM, (k.shape[0],) + page_table_BM.shape)
    return PagedLayerCache(k, v, table)
  layers = {s: {b: layer(kv) for b, kv in blocks.items()} for s, blocks in pools.items()}
  return DecodeCache(layers, jnp.asarray(lengths_B, jnp.int32))


def pools_of(cache: DecodeCache) -> dict:
  """The pools back out of a DecodeCache after a forward (tables dropped)."""
  return {s: {b: (c.k_pages, c.v_pages) for b, c in blocks.items()}
          for s, blocks in cache.layers.items()}

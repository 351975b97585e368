"""Paged KV cache: keys and values live in a pool of fixed-size pages, and each row owns a page
table saying which pages hold its positions (vLLM's PagedAttention layout, Levanter's page table).

Row b's position p lives in page `page_table_BM[b, p // page_size]` at offset `p % page_size`.
Page 0 is the null page: never handed out, it absorbs the writes of padding tokens and idle
rows, and unused table entries point at it (whatever it holds is masked by the row lengths).

Attention reads through the table with a gather ([B, M * page_size, K, H], slot s = position s,
this step's new keys placed at their positions), so the attention layer and every backend see
the layout of the dense cache; a ragged paged-attention kernel for TPU/GPU can replace
`keys_values` without touching the layer.

The pools never pass through the layer scan: slicing them per layer and stacking them back
would copy the whole KV store every step. Each layer's cache carries only its layer index, the
tables and (after `write`) its new keys; `forward` closes the layers over the stacked pools
while tracing and scatters every layer's new keys into them once, in place (donated).
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


_POOLS: list[dict] = []   # The stacked pools visible to PagedLayerCache while `forward` traces.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLayerCache:
  """One attention layer's view: `layer` its index in its stack's pools, the rows' tables
  [B, M], positions start_B, and after `write` the new keys/values [B, T, K, H]. `pool` (static)
  names the stack and block whose pools it reads; `page_size` (static) Z."""
  layer: jax.Array
  page_table_BM: jax.Array
  start_B: jax.Array
  new_k: jax.Array | None = None
  new_v: jax.Array | None = None
  pool: tuple[str, str] = dataclasses.field(default=('', ''), metadata=dict(static=True))
  page_size: int = dataclasses.field(default=16, metadata=dict(static=True))

  @property
  def size(self) -> int:
    """Positions a row can address: M pages x Z."""
    return self.page_table_BM.shape[-1] * self.page_size

  def write(self, k_BTKH, v_BTKH, start_B) -> 'PagedLayerCache':
    """Keeps this step's keys/values (`forward` scatters them into the pools afterwards)."""
    return dataclasses.replace(self, start_B=start_B, new_k=k_BTKH, new_v=v_BTKH)

  def keys_values(self) -> tuple[jax.Array, jax.Array]:
    """k_BSKH, v_BSKH gathered through the table, S = M * Z (slot s = position s), with the
    new keys at positions start_B[b]..start_B[b]+T-1."""
    if not _POOLS:
      raise RuntimeError('a paged cache is read only inside paged_cache.forward')
    k_pages, v_pages = _POOLS[-1][self.pool[0]][self.pool[1]]
    b, m = self.page_table_BM.shape

    def read(pages_RPZKH, new_BTKH):
      x = pages_RPZKH[self.layer, self.page_table_BM]        # [B, M, Z, K, H]
      x = x.reshape((b, m * self.page_size) + x.shape[-2:]).astype(new_BTKH.dtype)
      # New keys past the table (a chunk's padding at the end of the context) are dropped, not
      # clamped; S stays M * Z, so the logits equal the dense cache's bit for bit.
      pos_BT = self.start_B[:, None] + jnp.arange(new_BTKH.shape[1], dtype=jnp.int32)[None]
      x = x.at[jnp.arange(b)[:, None], pos_BT].set(new_BTKH, mode='drop')
      return sharding.constrain(x, CACHE_NAMES)

    return read(k_pages, self.new_k), read(v_pages, self.new_v)


def init_pools(cfg, num_pages: int, page_size: int) -> dict:
  """Empty pools mirroring the layer stacks: {'stack{j}': {'block{p}': (k, v)}}, each
  [R, P, Z, K, H] in the compute dtype."""
  shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
  pools = {}
  for j, (repeats, unit) in enumerate(cfg.layer_groups()):
    zeros = lambda: jnp.zeros((repeats,) + shape, jnp.dtype(cfg.dtype))
    pools[f'stack{j}'] = {f'block{p}': (zeros(), zeros()) for p in range(len(unit))}
  return pools


def forward(model, tokens_BT, pools: dict, page_table_BM, lengths_B):
  """The model on `tokens_BT` at each row's positions lengths_B[b].., reading and writing the
  paged pools. -> (logits_BTV, pools). Call inside jit with the pools donated."""
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  layers = {}
  for s, blocks in pools.items():
    layers[s] = {}
    for blk, (k, _) in blocks.items():
      r = k.shape[0]
      layers[s][blk] = PagedLayerCache(
          jnp.arange(r, dtype=jnp.int32),
          jnp.broadcast_to(page_table_BM, (r,) + page_table_BM.shape),
          jnp.broadcast_to(lengths_B, (r,) + lengths_B.shape), pool=(s, blk),
          page_size=k.shape[-3])
  _POOLS.append(pools)
  try:
    logits_BTV, cache = model(tokens_BT, DecodeCache(layers, lengths_B))
  finally:
    _POOLS.pop()
  z, m = list(list(pools.values())[0].values())[0][0].shape[-3], page_table_BM.shape[-1]
  pos_BT = lengths_B[:, None] + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None]
  page_BT = jnp.take_along_axis(page_table_BM, jnp.clip(pos_BT // z, 0, m - 1), axis=1)
  page_BT = jnp.where(pos_BT < m * z, page_BT, NULL_PAGE)   # Past the table: the null page.
  off_BT = pos_BT % z
  new_pools = {}
  for s, blocks in pools.items():
    new_pools[s] = {}
    for blk, (k, v) in blocks.items():
      c = cache.layers[s][blk]
      put = lambda pages, new_RBTKH: sharding.constrain(
          pages.at[:, page_BT, off_BT].set(new_RBTKH.astype(pages.dtype), mode='drop'),
          ('layers',) + PAGE_NAMES)
      new_pools[s][blk] = (put(k, c.new_k), put(v, c.new_v))
  return logits_BTV, new_pools

"""The paged KV cache (model/inference/paged_cache.py) against the dense per-row cache: the same
Decoder forward through scrambled page tables gives the same logits, bit for bit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import transformer
from model.inference import paged_cache
from model.inference.paged_cache import NULL_PAGE
from tests.conftest import tiny_model_config

Z = 4                  # Page size.
M = 16                 # Pages per row: M * Z = max_seq_len, the dense cache's size.
LENGTHS = np.asarray([5, 13, 2])   # Prompt lengths of the three rows.
CHUNK = int(LENGTHS.max())   # A second multi-token write at each row's own position (the
                             # prefill's width: one compiled shape fewer).
DECODE = 4             # Decode steps after it.
CONFIGS = [dict(), dict(layer_pattern='LG', sliding_window=4)]
IDS = ['global', 'sliding_LG_4']


@functools.partial(jax.jit, static_argnums=0)
def dense_forward(graphdef, params, tokens_BT, cache):
  return nnx.merge(graphdef, params)(tokens_BT, cache)


@functools.partial(jax.jit, static_argnums=0)
def paged_forward(graphdef, params, tokens_BT, pools, table_BM, lengths_B):
  return paged_cache.forward(nnx.merge(graphdef, params), tokens_BT, pools, table_BM, lengths_B)


@functools.lru_cache(maxsize=None)
def setup(i):
  cfg = tiny_model_config(**CONFIGS[i])
  assert M * Z == cfg.max_seq_len
  graphdef, params = nnx.split(transformer.build(cfg, seed=11))
  rng = np.random.default_rng(i)
  prompt = rng.integers(0, cfg.vocab_size, (len(LENGTHS), CHUNK)).astype(np.int32)
  chunk = rng.integers(0, cfg.vocab_size, (len(LENGTHS), CHUNK)).astype(np.int32)
  return cfg, graphdef, params.to_pure_dict(), prompt, chunk


def run(call, state, prompt, chunk, toks=None):
  """Prefill the right-padded prompts at 0, a chunk at each row's own position (its prompt
  length: the padding becomes free slots), then DECODE tokens: `toks` if given, else greedy
  (recorded). `call(tokens, state, starts) -> (logits, state)`. -> (logits list, state, fed)."""
  logits, state = call(prompt, state, np.zeros(len(LENGTHS), np.int32))
  outs = [np.asarray(logits)]
  logits, state = call(chunk, state, LENGTHS)
  outs.append(np.asarray(logits))
  fed = []
  for step in range(DECODE):
    tok = np.argmax(outs[-1][:, -1], -1).astype(np.int32) if toks is None else toks[step]
    fed.append(tok)
    logits, state = call(tok[:, None], state, LENGTHS + CHUNK + step)
    outs.append(np.asarray(logits))
  return outs, state, fed


@functools.lru_cache(maxsize=None)
def dense_run(i):
  """The reference: the dense per-row cache of M * Z slots (`Decoder.init_cache`)."""
  cfg, graphdef, params, prompt, chunk = setup(i)

  def call(tokens, cache, starts):
    return dense_forward(graphdef, params, jnp.asarray(tokens),
                         cache.with_lengths(np.asarray(starts, np.int32)))

  return run(call, transformer.init_cache(cfg, len(LENGTHS), M * Z), prompt, chunk)


def paged_run(i, table, num_pages, toks):
  cfg, graphdef, params, prompt, chunk = setup(i)

  def call(tokens, pools, starts):
    return paged_forward(graphdef, params, jnp.asarray(tokens), pools, jnp.asarray(table),
                         jnp.asarray(starts, jnp.int32))

  outs, pools, _ = run(call, paged_cache.init_pools(cfg, num_pages, Z), prompt, chunk, toks)
  return outs, {s: {b: (np.asarray(k), np.asarray(v)) for b, (k, v) in blocks.items()}
                for s, blocks in pools.items()}


def scrambled_tables(num_pages, rows_pages, seed, width=M):
  """Row b gets rows_pages[b] pages drawn at random (non-contiguous, interleaved across rows,
  never the null page); the rest of its table points at the null page."""
  ids = np.random.default_rng(seed).permutation(np.arange(1, num_pages))
  table = np.full((len(rows_pages), width), NULL_PAGE, np.int32)
  used = 0
  for b, n in enumerate(rows_pages):
    table[b, :n] = ids[used:used + n]
    used += n
  return table


def gathered(pools, table, b, n):
  """Row b's first n keys and values per layer, read from the pools in numpy via its table."""
  pos = np.arange(n)
  return [x[:, table[b, pos // Z], pos % Z] for blocks in pools.values()
          for kv in blocks.values() for x in kv]


def pool_arrays(pools):
  return [x for blocks in pools.values() for kv in blocks.values() for x in kv]


@pytest.mark.parametrize('i', range(len(CONFIGS)), ids=IDS)
def test_paged_forward_equals_dense_bit_for_bit(i):
  """Prefill of ragged rows, a chunk at per-row positions crossing page boundaries and decode
  steps: every logit equals the dense cache's, and the pages hold the dense cache's keys and
  values at every written position."""
  dense, dense_cache, toks = dense_run(i)
  num_pages = 1 + len(LENGTHS) * M + 5
  table = scrambled_tables(num_pages, [M] * len(LENGTHS), seed=i)
  assert not np.all(np.diff(table[0]) == 1)   # Really scrambled.
  paged, pools = paged_run(i, table, num_pages, toks)
  for step, (p, d) in enumerate(zip(paged, dense)):
    np.testing.assert_array_equal(p, d, err_msg=f'step {step}')
  for b, n in enumerate(LENGTHS + CHUNK + DECODE):
    want = [np.asarray(x)[:, b, :n] for blocks in dense_cache.layers.values()
            for c in blocks.values() for x in (c.k, c.v)]
    for got, w in zip(gathered(pools, table, b, n), want):
      np.testing.assert_array_equal(got, w)


@pytest.mark.parametrize('i', range(len(CONFIGS)), ids=IDS)
def test_null_page_absorbs_idle_rows_without_touching_others(i):
  """Row 1 idle (its whole table is the null page), rows 0 and 2 own only the pages they need
  (their padding and unused entries hit the null page too): rows 0 and 2 still equal the dense
  run bit for bit, all stray writes land on the null page, unowned pages stay untouched."""
  dense, _, toks = dense_run(i)
  need = [-(-(n + CHUNK + DECODE) // Z) for n in LENGTHS]
  need[1] = 0
  num_pages = 1 + len(LENGTHS) * M + 5
  table = scrambled_tables(num_pages, need, seed=10 + i)
  paged, pools = paged_run(i, table, num_pages, toks)
  # The prefill's padding positions past a row's pages read the null page: compare real ones.
  for b in (0, 2):
    np.testing.assert_array_equal(paged[0][b, :LENGTHS[b]], dense[0][b, :LENGTHS[b]])
  for step, (p, d) in enumerate(zip(paged[1:], dense[1:])):
    np.testing.assert_array_equal(p[[0, 2]], d[[0, 2]], err_msg=f'step {step + 1}')
  unowned = sorted(set(range(1, num_pages)) - set(table[table != NULL_PAGE].tolist()))
  for x in pool_arrays(pools):
    assert np.any(x[:, NULL_PAGE] != 0)
    assert not np.any(x[:, unowned])


def test_chunk_running_past_the_table_goes_to_the_null_page():
  """A chunk at positions 8..20 of a row whose table ends at 16 (the end of the context):
  positions inside the table are written and attended as with the dense cache, the rest goes
  to the null page (never to another page, never shifted)."""
  cfg, graphdef, params, _, _ = setup(0)
  m, t, num_pages = 4, CHUNK, 12
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 1, t)).astype(np.int32)
  table = scrambled_tables(num_pages, [m], seed=3, width=m)
  pools = paged_cache.init_pools(cfg, num_pages, Z)
  cache = transformer.init_cache(cfg, 1, M * Z)
  paged, dense = [], []
  for tok, start in zip(tokens, (0, 8)):
    starts = np.asarray([start], np.int32)
    logits, pools = paged_forward(graphdef, params, jnp.asarray(tok), pools, jnp.asarray(table),
                                  jnp.asarray(starts))
    paged.append(np.asarray(logits))
    logits, cache = dense_forward(graphdef, params, jnp.asarray(tok), cache.with_lengths(starts))
    dense.append(np.asarray(logits))
  inside = m * Z - 8
  np.testing.assert_allclose(paged[1][0, :inside], dense[1][0, :inside], rtol=1e-5, atol=1e-5)
  pools = {s: {b: tuple(np.asarray(x) for x in kv) for b, kv in blocks.items()}
           for s, blocks in pools.items()}
  want = [np.asarray(x)[:, 0, :m * Z] for blocks in cache.layers.values()
          for c in blocks.values() for x in (c.k, c.v)]
  for got, w in zip(gathered(pools, table, 0, m * Z), want):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
  unowned = sorted(set(range(1, num_pages)) - set(table[0].tolist()))
  for x in pool_arrays(pools):
    assert np.any(x[:, NULL_PAGE] != 0) and not np.any(x[:, unowned])

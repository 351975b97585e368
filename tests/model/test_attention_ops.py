import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import attention_ops, transformer
from model.attention_ops import AttentionMask, flash, splash
from tests.conftest import jit_apply, random_tokens, tiny_model_config

B, T, N, K, H = 2, 10, 4, 2, 8


def _qkv(seed=0, s=T):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = 3.0 * jax.random.normal(ks[0], (B, T, N, H))
  k = 3.0 * jax.random.normal(ks[1], (B, s, K, H))
  v = jax.random.normal(ks[2], (B, s, K, H))
  return q, k, v


POS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
SEG = jnp.asarray([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3], jnp.int32)
POS_PACKED = jnp.asarray([list(range(4)) + list(range(6)), list(range(7)) + list(range(3))],
                         jnp.int32)
CASES = {
    'causal': (AttentionMask(POS, POS), 0.0),
    'window': (AttentionMask(POS, POS, 3), 0.0),
    'segments': (attention_ops.causal(POS_PACKED, 0, SEG), 0.0),
    'segments_window_softcap': (attention_ops.causal(POS_PACKED, 2, SEG), 2.0),
    'softcap': (AttentionMask(POS, POS), 1.5),
    # A cache of 16 slots, rows filled to 12 and 16 (queries at 2..11 and 6..15): slots at or
    # past a row's length are free. (Every query sees at least one key in every case.)
    'cache_lengths': (AttentionMask(POS + jnp.asarray([[2], [6]]),
                                    jnp.arange(16, dtype=jnp.int32)[None], 4,
                                    kv_lengths_B=jnp.asarray([12, 16])), 0.0),
}


def _out_and_grads(attend, q, k, v, mask, w):
  """attend's output and d(sum(y * w))/d(q, k, v), one jit."""
  def f(q, k, v, mask):
    y, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    return (y,) + vjp(w.astype(y.dtype))
  return jax.jit(f)(q, k, v, mask)


def _assert_close(got, want, tol):
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol,
                               rtol=tol)


def _case(case):
  mask, cap = CASES[case]
  q, k, v = _qkv(1, mask.num_keys)
  w = jax.random.normal(jax.random.key(9), q.shape)
  xla = lambda q, k, v, m: attention_ops.get('xla')(q, k, v, m, cap)
  return mask, cap, (q, k, v), w, _out_and_grads(xla, q, k, v, mask, w)


@pytest.mark.parametrize('case', sorted(CASES))
def test_flash_equals_xla_in_outputs_and_gradients(case):
  mask, cap, qkv, w, want = _case(case)
  for block in (3, flash.BLOCK):  # Tiles that do not divide T or S, and one tile.
    got = _out_and_grads(lambda q, k, v, m: flash.attend(q, k, v, m, cap, block=block),
                         *qkv, mask, w)
    _assert_close(got, want, 1e-5)
  if jax.default_backend() == 'gpu' and not cap:
    bf = lambda a: a.astype(jnp.bfloat16)
    got = attention_ops.get('cudnn')(*map(bf, qkv), mask, 0.0)
    np.testing.assert_allclose(got.astype(jnp.float32), want[0], atol=5e-2)


@pytest.mark.parametrize('kv', [1, N], ids=['mqa', 'mha'])
def test_flash_and_splash_take_one_or_every_kv_head(kv):
  mask, cap = CASES['segments_window_softcap']
  ks = jax.random.split(jax.random.key(4), 4)
  q = 3.0 * jax.random.normal(ks[0], (B, T, N, H))
  k, v = 3.0 * jax.random.normal(ks[1], (B, T, kv, H)), jax.random.normal(ks[2], (B, T, kv, H))
  w = jax.random.normal(ks[3], q.shape)
  want = _out_and_grads(lambda q, k, v, m: attention_ops.get('xla')(q, k, v, m, cap), q, k, v,
                        mask, w)
  _assert_close(_out_and_grads(lambda q, k, v, m: flash.attend(q, k, v, m, cap, block=3),
                               q, k, v, mask, w), want, 1e-5)
  _assert_close(_out_and_grads(lambda q, k, v, _: splash.attend(q, k, v, mask, cap,
                                                                interpret=True),
                               q, k, v, mask, w), want, 1e-5)


def test_flash_takes_bfloat16_and_accumulates_in_float32():
  mask, cap, qkv, w, want = _case('segments_window_softcap')
  bf = tuple(a.astype(jnp.bfloat16) for a in qkv)
  got = _out_and_grads(lambda q, k, v, m: flash.attend(q, k, v, m, cap, block=4), *bf, mask, w)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  ref = _out_and_grads(lambda q, k, v, m: attention_ops.get('xla')(q, k, v, m, cap), *bf, mask, w)
  _assert_close(got, ref, 5e-2)  # Both round p, ds to bfloat16 the same way...
  _assert_close(got, want, 1e-1)  # ...and track float32.


@pytest.mark.parametrize('case', sorted(CASES))
def test_splash_in_interpret_mode_equals_xla(case, monkeypatch):
  mask, cap, qkv, w, want = _case(case)
  if mask.kv_lengths_B is None:
    # The kernel itself must answer: a fallback to 'flash' would give NaN.
    monkeypatch.setattr(flash, 'attend', lambda q, *_: jnp.full_like(q, jnp.nan))
  # The mask is closed over (not a jit argument), so its window is a static int: LocalMask.
  got = _out_and_grads(lambda q, k, v, _: splash.attend(q, k, v, mask, cap, interpret=True),
                       *qkv, mask, w)
  _assert_close(got, want, 1e-5)


def test_splash_runs_flash_where_positions_are_not_its_index_layout():
  # Packed positions without segment ids: the kernel's index mask would differ.
  mask = AttentionMask(POS_PACKED, POS_PACKED)
  q, k, v = _qkv(2)
  want = attention_ops.get('xla')(q, k, v, mask, 0.0)
  got = jax.jit(lambda q, k, v, m: splash.attend(q, k, v, m, interpret=True))(q, k, v, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('impl,platform,message', [
    ('splash', 'tpu', "config.model.attention_impl='splash' is a TPU kernel"),
    ('cudnn', 'gpu', "config.model.attention_impl='cudnn' needs an NVIDIA GPU")])
def test_accelerator_kernels_refuse_elsewhere_in_one_line(impl, platform, message):
  if jax.default_backend() == platform:
    pytest.skip(f'a {platform} is present')
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=message):
    attention_ops.get(impl)(q, k, v, AttentionMask(POS, POS), 0.0)


def test_registry_is_the_config_choice():
  from model.config import ConfigError, MODEL_RULES, ModelConfig
  assert MODEL_RULES['attention_impl'].choices == tuple(attention_ops.BACKENDS)
  with pytest.raises(ConfigError, match='config.model.attention_impl'):
    ModelConfig(attention_impl='pallas').validate()


def _with_impl(model, impl):
  graphdef, state = nnx.split(model)
  cfg = tiny_model_config(**{**_GEMMA2, 'attention_impl': impl})
  other_graphdef, _ = nnx.split(transformer.abstract(cfg))
  return nnx.merge(other_graphdef, state)


_GEMMA2 = dict(activation='geglu', post_norms=True, attn_softcap=5.0, logit_softcap=30.0,
               layer_pattern='LG', sliding_window=4)


@pytest.fixture(scope='module')
def gemma2_model():
  """One tiny Gemma-2-like model (soft-caps, local + global layers) for the model tests."""
  return transformer.build(tiny_model_config(**_GEMMA2), seed=1)


@pytest.fixture
def small_tiles(monkeypatch):
  """Several flash tiles at test lengths; splash in Pallas's interpreter."""
  monkeypatch.setattr(flash, 'BLOCK', 4)
  monkeypatch.setattr(splash, 'INTERPRET', True)


@pytest.mark.parametrize('impl', ['flash', pytest.param('splash', marks=pytest.mark.slow)])
def test_model_equals_xla_model_in_logits_and_gradients(impl, gemma2_model, small_tiles):
  xla_model = gemma2_model
  tokens = random_tokens(0, (2, 11), 61)

  def logits_and_grads(model):
    graphdef, params = nnx.split(model)

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens)[0]
      return jnp.mean(logits ** 2), logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)

  want, got = logits_and_grads(xla_model), logits_and_grads(_with_impl(xla_model, impl))
  np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0)
  for g, w in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_flash_cached_decoding_and_chunked_prefill_equal_the_uncached_xla_forward(gemma2_model,
                                                                                 small_tiles):
  xla_model = gemma2_model
  tokens = random_tokens(5, (2, 14), 61)
  want = jit_apply(xla_model)(tokens)[0]  # Causal: row r's first n logits are its n-token run.
  model = _with_impl(xla_model, 'flash')
  graphdef, params = nnx.split(model)
  f = jax.jit(lambda p, t, c: nnx.merge(graphdef, p)(t, c, None))
  # Right-padded prefill of rows of 2 and 9 tokens, then 5 single-token steps at per-row
  # lengths (a cache of 16 slots = 4 key tiles, some skipped).
  logits, cache = f(params, tokens[:, :9], model.init_cache(2, 16))
  cache = cache.with_lengths([2, 9])
  got = [[logits[0, :2]], [logits[1, :9]]]
  for step in range(5):
    tok = jnp.stack([tokens[0, 2 + step], tokens[1, 9 + step]])[:, None]
    logits, cache = f(params, tok, cache)
    got[0].append(logits[0])
    got[1].append(logits[1])
  np.testing.assert_allclose(jnp.concatenate(got[0]), want[0, :7], atol=1e-5, rtol=0)
  np.testing.assert_allclose(jnp.concatenate(got[1]), want[1], atol=1e-5, rtol=0)
  # Chunked prefill: chunks of 5, 5 and 4 tokens.
  cache, chunks = model.init_cache(2, 16), []
  for a, b in ((0, 5), (5, 10), (10, 14)):
    logits, cache = f(params, tokens[:, a:b], cache)
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('impl', ['xla', 'flash', 'splash'])
def test_packed_documents_equal_each_document_alone(impl, gemma2_model, small_tiles):
  model = _with_impl(gemma2_model, impl)
  graphdef, params = nnx.split(model)
  fwd = jax.jit(lambda p, t, s, pos: nnx.merge(graphdef, p)(t, segment_ids_BT=s,
                                                            positions_BT=pos)[0])
  plain = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
  doc_a, doc_b = random_tokens(3, (1, 5), 61), random_tokens(4, (1, 7), 61)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
  got = fwd(params, packed, seg, pos)
  # flash sums a row's masked-out keys as exact zeros, but over a different number of blocks
  # than the document alone: float32 rounding of order 1e-6 on logits of order 1.
  tol = 1e-6 if impl == 'xla' else 5e-6
  np.testing.assert_allclose(got[:, :5], plain(params, doc_a), atol=tol, rtol=0)
  np.testing.assert_allclose(got[:, 5:], plain(params, doc_b), atol=tol, rtol=0)
  # Without segment ids the second document sees the first.
  assert float(jnp.max(jnp.abs(fwd(params, packed, None, pos)[:, 5:] - got[:, 5:]))) > 1e-3

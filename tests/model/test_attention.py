import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import transformer
from model.attention import Attention
from tests.conftest import jit_apply, random_tokens, tiny_model_config


def test_causality_later_tokens_do_not_change_earlier_logits():
  cfg = tiny_model_config()
  f = jit_apply(transformer.build(cfg))
  a = random_tokens(0, (2, 12), cfg.vocab_size)
  b = a.at[:, 7:].set(random_tokens(1, (2, 5), cfg.vocab_size))
  la, lb = f(a)[0], f(b)[0]
  np.testing.assert_allclose(la[:, :7], lb[:, :7], atol=1e-6)
  assert float(jnp.max(jnp.abs(la[:, 7:] - lb[:, 7:]))) > 1e-3


def test_gqa_and_mqa_equal_mha_with_repeated_kv_heads():
  for kv in (1, 2):
    gqa_cfg = tiny_model_config(num_heads=4, num_kv_heads=kv)
    mha_cfg = tiny_model_config(num_heads=4, num_kv_heads=4)
    gqa = Attention(gqa_cfg, nnx.Rngs(0))
    mha = Attention(mha_cfg, nnx.Rngs(1))
    group = 4 // kv
    # Query head n reads KV head n // group: repeat each KV head `group` times.
    mha.w_q[...] = gqa.w_q[...]
    mha.w_o[...] = gqa.w_o[...]
    mha.w_k[...] = jnp.repeat(gqa.w_k[...], group, axis=1)
    mha.w_v[...] = jnp.repeat(gqa.w_v[...], group, axis=1)
    x = jax.random.normal(jax.random.key(2), (2, 9, gqa_cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    np.testing.assert_allclose(gqa(x, pos)[0], mha(x, pos)[0], atol=1e-5)


def test_attention_rejects_nothing_but_masks_unfilled_cache_slots():
  cfg = tiny_model_config()
  attn = Attention(cfg, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 3, cfg.d_model))
  pos = jnp.arange(3)[None]
  full, _ = attn(x, pos)
  cache = {'k': jnp.full((1, 8, cfg.num_kv_heads, cfg.head_dim), 1e3),   # garbage in unused slots
           'v': jnp.full((1, 8, cfg.num_kv_heads, cfg.head_dim), 1e3)}
  cached, new = attn(x, pos, cache, 0)
  np.testing.assert_allclose(cached, full, atol=1e-5)
  assert new['k'].shape == cache['k'].shape


def test_sliding_window_sees_exactly_the_last_w_positions():
  cfg = tiny_model_config()
  attn = Attention(cfg, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 10, cfg.d_model))
  pos = jnp.arange(10)[None]
  y, _ = attn(x, pos, window=3)
  # Changing positions 0..5 leaves outputs at 8 and 9 (keys 6..9) unchanged; 7 sees position 5.
  x2 = x.at[:, :6].set(jax.random.normal(jax.random.key(1), (1, 6, cfg.d_model)))
  y2, _ = attn(x2, pos, window=3)
  np.testing.assert_allclose(y[:, 8:], y2[:, 8:], atol=1e-6)
  assert float(jnp.max(jnp.abs(y[:, 7] - y2[:, 7]))) > 1e-4
  # A window as long as the sequence is plain causal attention.
  np.testing.assert_allclose(attn(x, pos, window=10)[0], attn(x, pos)[0], atol=1e-6)


def test_attention_softcap_and_query_scale():
  from model.attention import attend
  q = 10.0 * jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  k = 10.0 * jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
  v = jax.random.normal(jax.random.key(2), (1, 4, 2, 8))
  pos = jnp.arange(4)[None]
  cap = 2.0
  capped = attend(q, k, v, pos, jnp.arange(4), softcap=cap)
  # The formula: logits = cap * tanh(q.k / cap), causal mask, softmax, weighted sum of v.
  q5 = q.reshape(1, 4, 2, 1, 8)
  logits = cap * jnp.tanh(jnp.einsum('btkgh,bskh->bkgts', q5, k) / cap)
  logits = jnp.where(jnp.tril(jnp.ones((4, 4), bool)), logits, -jnp.inf)
  want = jnp.einsum('bkgts,bskh->btkgh', jax.nn.softmax(logits, -1), v).reshape(1, 4, 2, 8)
  np.testing.assert_allclose(capped, want, atol=1e-5, rtol=0)
  assert not np.allclose(capped, attend(q, k, v, pos, jnp.arange(4)), atol=1e-3)
  cfg = tiny_model_config(query_scale_dim=32)
  a1, a2 = Attention(cfg, nnx.Rngs(0)), Attention(tiny_model_config(), nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (1, 5, cfg.d_model))
  assert not np.allclose(a1(x, jnp.arange(5)[None])[0], a2(x, jnp.arange(5)[None])[0])

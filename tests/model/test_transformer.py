import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import transformer
from tests.conftest import jit_apply, random_tokens, tiny_model_config

VARIANTS = {
    'serial_gqa_swiglu': {},
    'parallel_mqa_palm': dict(block='parallel', num_kv_heads=1),
    'mha_geglu_gemma': dict(num_kv_heads=4, activation='geglu', scale_embeddings=True,
                            logit_softcap=30.0),
    'untied_gelu': dict(tie_embeddings=False, activation='gelu'),
    # Windows shorter than the sequence, so cached decoding must apply them too.
    'gemma2_like': dict(activation='geglu', scale_embeddings=True, norm_offset_one=True,
                        post_norms=True, attn_softcap=5.0, logit_softcap=30.0, layer_pattern='LG',
                        sliding_window=4, query_scale_dim=12),
    'gemma3_like': dict(num_layers=3, num_kv_heads=1, qk_norm=True, post_norms=True,
                        layer_pattern='LLG', sliding_window=3, rope_base=1e6, rope_base_local=1e4,
                        rope_scaling='linear', rope_scaling_factor=8.0),
    'mistral_llama3_like': dict(tie_embeddings=False, layer_pattern='LG', sliding_window=5,
                                rope_scaling='llama3', rope_original_max_len=16, rope_base=500.0),
}


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_shapes_param_count_and_cached_decoding(name):
  cfg = tiny_model_config(**VARIANTS[name])
  model = transformer.build(cfg)
  assert transformer.count_params(model) == cfg.param_count()
  f = jit_apply(model)
  tokens = random_tokens(0, (2, 11), cfg.vocab_size)
  full, cache = f(tokens)
  assert full.shape == (2, 11, cfg.vocab_size) and full.dtype == jnp.float32
  assert cache is None
  # Prefill 5 tokens, then decode the remaining 6 one at a time.
  cache = transformer.init_cache(cfg, 2, 16)
  logits, cache = f(tokens[:, :5], cache, 0)
  steps = [logits]
  for i in range(5, 11):
    logits, cache = f(tokens[:, i:i + 1], cache, i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_remat_policies_give_identical_loss_and_grads():
  outs = []
  for remat in ('none', 'full', 'dots'):
    cfg = tiny_model_config(remat=remat)
    graphdef, params = nnx.split(transformer.build(cfg))
    tokens = random_tokens(0, (2, 8), cfg.vocab_size)

    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p)(tokens)[0] ** 2)

    outs.append(jax.jit(jax.value_and_grad(loss))(params))
  for other in outs[1:]:
    np.testing.assert_allclose(other[0], outs[0][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(other[1]), jax.tree.leaves(outs[0][1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  cfg32 = tiny_model_config()
  cfg16 = tiny_model_config(dtype='bfloat16')
  m16 = transformer.build(cfg16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16)))
  tokens = random_tokens(0, (2, 8), cfg32.vocab_size)
  l32 = jit_apply(transformer.build(cfg32))(tokens)[0]
  l16 = jit_apply(m16)(tokens)[0]
  assert l16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1


def test_layers_are_stacked_for_scan():
  cfg = tiny_model_config(num_layers=3)
  state = nnx.state(transformer.build(cfg)).to_pure_dict()
  assert state['stack0']['block0']['attn']['w_q'].shape == (3, cfg.d_model, cfg.num_heads, cfg.head_dim)
  specs = nnx.get_partition_spec(nnx.state(transformer.abstract(cfg))).to_pure_dict()
  assert tuple(specs['stack0']['block0']['attn']['w_q']) == ('layers', 'embed', 'heads', 'head_dim')
  assert tuple(specs['embedder']['embedding']) == ('vocab', 'embed')


def test_cache_larger_than_context_is_refused():
  cfg = tiny_model_config(max_seq_len=16)
  with pytest.raises(ValueError, match='max_seq_len'):
    transformer.init_cache(cfg, 1, 17)


@pytest.mark.parametrize('overrides', [{}, dict(layer_pattern='LG', sliding_window=4)],
                         ids=['global', 'sliding_LG_4'])
def test_ragged_cached_decoding_equals_the_uncached_forward_per_row(overrides):
  cfg = tiny_model_config(**overrides)
  model = transformer.build(cfg, seed=1)
  graphdef, params = nnx.split(model)
  f = jax.jit(lambda p, t, c, i: nnx.merge(graphdef, p)(t, c, i))
  full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
  lengths = [2, 9]
  tokens = random_tokens(2, (2, 14), cfg.vocab_size)
  # Right-padded prefill of rows of 2 and 9 tokens, then 5 decode steps at per-row positions.
  cache = model.init_cache(2, 16)
  logits, cache = f(params, tokens[:, :9], cache, None)
  cache = cache.with_lengths(lengths)
  got = [[logits[0, :2]], [logits[1, :9]]]
  for step in range(5):
    tok = jnp.stack([tokens[0, 2 + step], tokens[1, 9 + step]])[:, None]
    logits, cache = f(params, tok, cache, None)
    got[0].append(logits[0])
    got[1].append(logits[1])
  np.testing.assert_array_equal(cache.lengths_B, [7, 14])
  for r, n in enumerate(lengths):
    want = full(params, tokens[r:r + 1, :n + 5])[0]
    np.testing.assert_allclose(jnp.concatenate(got[r]), want, atol=1e-5)


def test_cache_is_made_by_the_layers_with_logical_names():
  cfg = tiny_model_config(num_layers=3)
  cache = transformer.init_cache(cfg, 2, 8)
  k = cache.layers['stack0']['block0'].k
  assert k.shape == (3, 2, 8, cfg.num_kv_heads, cfg.head_dim)
  names = cache.logical_names()
  assert names.layers['stack0']['block0'].k == ('layers', 'batch', 'cache_length', 'act_kv_heads',
                                                None)
  assert cache.lengths_B.shape == (2,)


def test_unrolled_layers_equal_the_scanned_stack():
  """scan_layers=False unrolls the same stacked parameters: same logits and gradients."""
  import numpy as np
  cfg = tiny_model_config(num_layers=3)
  model = transformer.build(cfg)
  graphdef, params = nnx.split(model)
  unrolled = nnx.graphdef(transformer.build(dataclasses.replace(cfg, scan_layers=False)))
  tokens = random_tokens(0, (2, 9), cfg.vocab_size)

  def loss(g, p):
    return jnp.sum(jnp.tanh(nnx.merge(g, p)(tokens)[0]))

  a, ga = jax.value_and_grad(lambda p: loss(graphdef, p))(params)
  b, gb = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
  np.testing.assert_allclose(b, a, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), gb, ga)

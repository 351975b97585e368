import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import attention_ops, transformer
from model.attention_ops import AttentionMask, flash
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


@pytest.mark.parametrize('case', sorted(CASES))
def test_flash_equals_xla(case):
  mask, cap = CASES[case]
  q, k, v = _qkv(1, mask.num_keys)
  want = attention_ops.get('xla')(q, k, v, mask, cap)
  for block in (3, 4, flash.BLOCK):  # Blocks that do and do not divide S.
    got = jax.jit(lambda q, k, v, m: flash.attend(q, k, v, m, cap, block=block))(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  if jax.default_backend() == 'gpu' and not cap:
    bf = lambda a: a.astype(jnp.bfloat16)
    got = attention_ops.get('cudnn')(bf(q), bf(k), bf(v), mask, 0.0)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_cudnn_refuses_off_gpu_in_one_line():
  if jax.default_backend() == 'gpu':
    pytest.skip('a GPU is present')
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"config.model.attention_impl='cudnn' needs an NVIDIA GPU"):
    attention_ops.get('cudnn')(q, k, v, AttentionMask(POS, POS), 0.0)


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


def test_flash_model_equals_xla_model():
  xla_model = transformer.build(tiny_model_config(**_GEMMA2), seed=1)
  flash_model = _with_impl(xla_model, 'flash')
  tokens = random_tokens(0, (2, 11), 61)
  np.testing.assert_allclose(jit_apply(flash_model)(tokens)[0], jit_apply(xla_model)(tokens)[0],
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize('impl', ['xla', 'flash'])
def test_packed_documents_equal_each_document_alone(impl):
  model = _with_impl(transformer.build(tiny_model_config(**_GEMMA2), seed=2), impl)
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

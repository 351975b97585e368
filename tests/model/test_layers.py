import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import layers
from tests.conftest import tiny_model_config


def test_rmsnorm_unit_rms():
  cfg = tiny_model_config()
  norm = layers.RMSNorm(cfg, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model)) * 7.0 + 3.0
  y = norm(x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y * y, -1)), 1.0, rtol=1e-4)


def test_rope_depends_only_on_relative_position():
  h = 16
  q = jax.random.normal(jax.random.key(1), (1, 1, 1, h))
  k = jax.random.normal(jax.random.key(2), (1, 1, 1, h))

  def score(pq, pk):
    inv = layers.rope_inv_freq(h, 10_000.0, tiny_model_config())
    rq = layers.rope(q, jnp.array([[pq]]), inv)
    rk = layers.rope(k, jnp.array([[pk]]), inv)
    return float(jnp.sum(rq * rk))

  base = score(7, 3)
  for shift in (1, 10, 123):
    np.testing.assert_allclose(score(7 + shift, 3 + shift), base, rtol=1e-4, atol=1e-5)
  assert abs(score(7, 3) - score(7, 5)) > 1e-3  # ... and it does depend on it.


def test_rope_preserves_norm_and_is_identity_at_zero():
  x = jax.random.normal(jax.random.key(3), (2, 4, 3, 8))
  pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
  y = layers.rope(x, pos, layers.rope_inv_freq(8, 500.0, tiny_model_config()))
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)


def test_mlp_variants_shapes_and_param_counts():
  for act, n_mats in (('swiglu', 3), ('geglu', 3), ('gelu', 2)):
    cfg = tiny_model_config(activation=act)
    mlp = layers.MLP(cfg, nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(mlp)))
    assert n == n_mats * cfg.d_model * cfg.mlp_dim
    assert mlp(jnp.ones((2, 3, cfg.d_model))).shape == (2, 3, cfg.d_model)


def test_logit_softcap_bounds_logits():
  cfg = tiny_model_config(logit_softcap=2.0)
  emb = layers.Embedder(cfg, nnx.Rngs(0))
  logits = emb.decode(100.0 * jax.random.normal(jax.random.key(0), (1, 3, cfg.d_model)))
  assert float(jnp.max(jnp.abs(logits))) <= 2.0


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
  cfg = tiny_model_config(rope_scaling='llama3', rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                          rope_high_freq_factor=4.0, rope_original_max_len=8192)
  plain = layers.rope_inv_freq(128, 500_000.0, tiny_model_config())
  scaled = layers.rope_inv_freq(128, 500_000.0, cfg)
  wavelen = 2 * np.pi / np.asarray(plain)
  high, low = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
  np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)
  mid = ~high & ~low
  assert (scaled[mid] < plain[mid]).all() and (scaled[mid] > plain[mid] / 8.0).all()


def test_gemma_norm_offset_starts_at_unit_gain():
  plain = layers.RMSNorm(tiny_model_config(), nnx.Rngs(0))
  gemma = layers.RMSNorm(tiny_model_config(norm_offset_one=True), nnx.Rngs(0))
  assert float(jnp.abs(gemma.scale[...]).max()) == 0.0
  x = jax.random.normal(jax.random.key(0), (2, 3, 32))
  np.testing.assert_allclose(gemma(x), plain(x), rtol=1e-6)


def test_every_projection_is_one_linear_class_with_its_contraction():
  # Issue 11 item 4: LoRA and quantization wrap or replace this one class.
  from model import transformer
  from model.layers import Linear, linear
  model = transformer.Decoder(tiny_model_config(tie_embeddings=False), nnx.Rngs(params=0))
  found = {jax.tree_util.keystr(p).split("'")[-2]: v.eq for p, v in
           jax.tree_util.tree_flatten_with_path(nnx.state(model, Linear),
                                                is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
  assert found == {'w_q': 'btd,dnh->btnh', 'w_k': 'btd,dkh->btkh', 'w_v': 'btd,dkh->btkh',
                   'w_o': 'btnh,nhd->btd', 'w_gate': 'btd,df->btf', 'w_up': 'btd,df->btf',
                   'w_down': 'btf,fd->btd', 'unembedding': 'btd,dv->btv'}
  # Paths are a plain parameter's: the checkpoint layout does not change.
  paths = {jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(model).to_pure_dict())[0]}
  assert "['stack0']['block0']['attn']['w_q']" in paths
  # The metadata survives split/merge into a jitted function (as in every step).
  graphdef, params = nnx.split(model)
  tokens = jnp.zeros((1, 4), jnp.int32)
  out = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens)[0])(params.to_pure_dict())
  assert out.shape == (1, 4, 61)
  with pytest.raises(ValueError, match='disagree on the weight rank'):
    linear(nnx.Rngs(0), jax.nn.initializers.zeros, (2, 3), ('embed', 'mlp'), jnp.float32,
           'btd,dnh->btnh')

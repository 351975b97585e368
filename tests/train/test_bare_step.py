"""The benchmark's bare-JAX step is the same model as palmax: equal losses and updates on the
same weights, so `launch.bench`'s ratio compares implementations, not models."""
import jax
import numpy as np
import pytest
from flax import nnx

from model import transformer
from tests.conftest import tiny_model_config
from train import bare_step
from train.objectives.lm import NextToken
from train.step import ModelForward


def to_bare(params: dict, cfg) -> dict:
  """palmax's stacked parameters -> the bare step's per-layer dict."""
  blocks = params['stack0']['block0']
  layers = []
  for r in range(cfg.num_layers):
    a, m = blocks['attn'], blocks['mlp']
    layer = {'attn_norm': blocks['attn_norm']['scale'][r], 'mlp_norm': blocks['mlp_norm']['scale'][r],
             'w_q': a['w_q'][r].reshape(cfg.d_model, -1), 'w_k': a['w_k'][r].reshape(cfg.d_model, -1),
             'w_v': a['w_v'][r].reshape(cfg.d_model, -1), 'w_o': a['w_o'][r].reshape(-1, cfg.d_model),
             'w_gate': m['w_gate'][r], 'w_down': m['w_down'][r]}
    if cfg.gated:
      layer['w_up'] = m['w_up'][r]
    layers.append(layer)
  out = {'embedding': params['embedder']['embedding'], 'final_norm': params['final_norm']['scale'],
         'layers': layers}
  if not cfg.tie_embeddings:
    out['unembedding'] = params['embedder']['unembedding']
  return out


@pytest.mark.parametrize('overrides', [{}, dict(activation='gelu', tie_embeddings=False,
                                                num_kv_heads=4)])
def test_bare_loss_and_gradients_equal_palmax(overrides):
  cfg = tiny_model_config(**overrides)
  model = transformer.build(cfg)
  params = nnx.state(model).to_pure_dict()
  tokens = jax.random.randint(jax.random.key(1), (3, 17), 0, cfg.vocab_size)
  graphdef = nnx.graphdef(model)

  def palmax_loss(p):
    return NextToken(z_loss=0.0).loss(ModelForward(nnx.merge(graphdef, p)), {'tokens': tokens})[0]

  ref, ref_g = jax.value_and_grad(palmax_loss)(params)
  got, got_g = jax.value_and_grad(bare_step.loss_fn)(to_bare(params, cfg), tokens, cfg)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_g,
               to_bare(ref_g, cfg))


def test_unsupported_shapes_are_refused_by_name():
  with pytest.raises(ValueError, match='config.model.qk_norm'):
    bare_step.check_supported(tiny_model_config(qk_norm=True))

"""The fused output projection + cross-entropy equals the materialised-logits reference, in the
loss, its metrics and the gradients, and a train step with it equals the plain step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_model_config
from train import loss as loss_lib


def _case(seed=0, b=2, t=12, d=16, v=50):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(v, d)) * 0.3, jnp.float32),
          jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
          jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32))


@pytest.mark.parametrize('softcap', [0.0, 5.0])
@pytest.mark.parametrize('chunk_tokens', [1, 8, 10_000])   # t=1, 4 (12 = 3 chunks), whole
def test_fused_equals_materialised_logits_with_gradients(softcap, chunk_tokens):
  x, w, targets, weights = _case()

  def reference(x, w):
    logits = jnp.einsum('btd,vd->btv', x, w)
    if softcap:
      logits = softcap * jnp.tanh(logits / softcap)
    return loss_lib.cross_entropy(logits, targets, weights, 1e-2)

  def fused(x, w):
    return loss_lib.fused_cross_entropy(x, w, targets, weights, 1e-2, softcap, jnp.float32,
                                        chunk_tokens)

  (ref, ref_m), ref_g = jax.value_and_grad(reference, (0, 1), has_aux=True)(x, w)
  (got, got_m), got_g = jax.value_and_grad(fused, (0, 1), has_aux=True)(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for k in ('loss', 'z_loss', 'weight'):
    np.testing.assert_allclose(got_m[k], ref_m[k], rtol=1e-6)
  for g, r in zip(got_g, ref_g):
    np.testing.assert_allclose(g, r, atol=1e-6)
  # Without differentiation (eval) the same numbers come out of the plain forward.
  np.testing.assert_allclose(jax.jit(fused)(x, w)[0], ref, rtol=1e-6)


def test_chunk_length_divides_the_sequence():
  assert loss_lib.chunk_length(12, 2, 8) == 4
  assert loss_lib.chunk_length(256, 8, 2048) == 256
  assert loss_lib.chunk_length(7, 1, 4) == 1      # 7 is prime: single tokens.
  assert loss_lib.chunk_length(12, 4, 1) == 1


def test_train_step_with_fused_loss_equals_plain_step():
  from flax import nnx
  from model import transformer
  from train import optim, step as step_lib
  from train.objectives.lm import NextToken
  import ml_collections

  cfg = tiny_model_config(tie_embeddings=False, logit_softcap=20.0)
  graphdef, params = nnx.split(transformer.build(cfg))
  params = params.to_pure_dict()
  tcfg = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, lr_end_fraction=0.1, b1=0.9,
                                        b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  tx, schedule = optim.make_optimizer(tcfg, 10)
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, cfg.vocab_size)
  outs = []
  for chunk in (0, 16):
    objective = NextToken(z_loss=1e-3)
    objective.chunk_tokens = chunk
    step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, objective=objective))
    state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32),
             'rng': jnp.zeros((2,), jnp.uint32)}
    state, metrics = step(state, tokens)
    outs.append((state['params'], metrics))
  (p0, m0), (p1, m1) = outs
  for k in ('loss', 'z_loss', 'grad_norm'):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p0)

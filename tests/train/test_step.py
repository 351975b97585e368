import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from model import sharding
from tests.conftest import tiny_model_config
from train import optim, state as state_lib, step as step_lib
from train.loss import cross_entropy


def _setup(grad_accum=1, lr=1e-2, clip_norm=1.0, **model):
  cfg = tiny_model_config(**model)
  tcfg = ml_collections.ConfigDict(dict(lr=lr, warmup_steps=1, lr_end_fraction=0.1, b1=0.9, b2=0.95,
                                        eps=1e-8, weight_decay=0.0, clip_norm=clip_norm))
  tx, schedule = optim.make_optimizer(tcfg, 100)
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  spec = state_lib.make_state_spec(cfg, tx, mesh, sharding.check_rules(sharding.DEFAULT_RULES))
  state = state_lib.init_state(spec, cfg, tx, seed=0)
  step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, grad_accum=grad_accum))
  return cfg, state, step


def test_loss_falls_when_overfitting_one_batch():
  cfg, state, step = _setup()
  batch = jax.random.randint(jax.random.key(0), (4, 17), 0, cfg.vocab_size, dtype=jnp.int32)
  losses = []
  for _ in range(60):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[0] > 3.5                   # ~ log(61) at init
  assert losses[-1] < 0.25 * losses[0]     # memorised


def test_grad_accumulation_matches_one_big_batch():
  _, s1, step1 = _setup(grad_accum=1)
  _, s2, step2 = _setup(grad_accum=4)
  batch = jax.random.randint(jax.random.key(1), (8, 9), 0, 61, dtype=jnp.int32)
  for _ in range(2):
    s1, m1 = step1(s1, batch)
    s2, m2 = step2(s2, batch)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1['params']), jax.tree.leaves(s2['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_step_leaves_state_unchanged():
  _, state, step = _setup()
  state['params']['final_norm']['scale'] = state['params']['final_norm']['scale'].at[0].set(jnp.nan)
  before = jax.tree.map(np.asarray, state)
  batch = jnp.zeros((2, 9), jnp.int32)
  state, m = step(state, batch)
  assert float(m['finite']) == 0.0
  for a, b in zip(jax.tree.leaves(before['opt_state']), jax.tree.leaves(state['opt_state'])):
    np.testing.assert_array_equal(a, b)
  assert int(state['step']) == 1


def test_schedule_warmup_then_cosine_to_ten_percent():
  s = optim.learning_rate_schedule(1.0, 10, 110, 0.1)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.55, rel=1e-3)   # Cosine midpoint between 1 and 0.1.
  assert float(s(110)) == pytest.approx(0.1)


def test_weight_decay_skips_norm_scales():
  cfg, state, _ = _setup()
  tcfg = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=1, lr_end_fraction=1.0, b1=0.9, b2=0.95,
                                        eps=1e-8, weight_decay=0.5, clip_norm=0.0))
  tx, _ = optim.make_optimizer(tcfg, 10)
  params = state['params']
  zero = jax.tree.map(jnp.zeros_like, params)
  opt = tx.init(params)
  opt = tx.update(zero, opt, params)[1]  # Step 0 has lr 0 (warmup); take the second update.
  updates, _ = tx.update(zero, opt, params)
  assert float(jnp.abs(updates['final_norm']['scale']).max()) == 0.0
  assert float(jnp.abs(updates['stack0']['block0']['attn_norm']['scale']).max()) == 0.0
  assert float(jnp.abs(updates['stack0']['block0']['mlp']['w_up']).max()) > 0.0


def test_cross_entropy_weights_and_z_loss():
  logits = jnp.array([[[0.0, 0.0], [2.0, 0.0]]])
  targets = jnp.array([[0, 1]])
  total, aux = cross_entropy(logits, targets, jnp.array([[1.0, 0.0]]), z_loss=0.5)
  np.testing.assert_allclose(aux['loss'], np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(total, np.log(2.0) + 0.5 * np.log(2.0) ** 2, rtol=1e-6)


# ---- MoE models ------------------------------------------------------------------------------

def _moe(**kw):
  from model.config import MoEConfig
  base = dict(num_experts=4, top_k=2, expert_mlp_dim=16, dispatch='dropless')
  base.update(kw)
  return MoEConfig(**base)


def test_moe_loss_adds_balance_and_z_losses():
  cfg, state, _ = _setup(moe=_moe(aux_loss_coef=0.5, router_z_loss_coef=0.25))
  graphdef = state_lib.make_state_spec(cfg, optim.make_optimizer(
      ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, lr_end_fraction=0.1, b1=0.9, b2=0.95,
                                     eps=1e-8, weight_decay=0.0, clip_norm=1.0)), 10)[0],
      sharding.make_mesh({'data': 1}, jax.devices()[:1]),
      sharding.check_rules(sharding.DEFAULT_RULES)).graphdef
  batch = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size, dtype=jnp.int32)
  total, aux = step_lib.make_loss_fn(graphdef, 0.0)(state['params'], batch)
  stats = step_lib.moe_metrics(aux['moe'], cfg)
  assert stats['moe_load'].shape == (cfg.num_layers, 4)
  np.testing.assert_allclose(stats['moe_load'].sum(-1), 1.0, rtol=1e-6)
  # Balance loss is >= its coefficient (Switch: equality only under uniform routing).
  assert float(stats['moe_aux_loss']) >= cfg.num_layers * 0.5 - 1e-5
  np.testing.assert_allclose(total, aux['loss'] + stats['moe_aux_loss'] + stats['moe_z_loss'],
                             rtol=1e-6)


def test_moe_step_updates_router_bias_against_load():
  rate = 1e-2
  cfg, state, step = _setup(moe=_moe(gating='sigmoid', bias_update_rate=rate))
  batch = jax.random.randint(jax.random.key(3), (4, 9), 0, cfg.vocab_size, dtype=jnp.int32)
  new_state, m = step(state, batch)
  bias = new_state['params']['stack0']['block0']['mlp']['router_bias']   # [L, E]
  load = np.asarray(m['moe_load'])                                       # [L, E]
  want = rate * np.sign(load.mean(-1, keepdims=True) - load)
  np.testing.assert_allclose(bias, want, atol=1e-7)
  assert np.any(want != 0)
  # Only the bias moves by the rule: it gets no optimizer update of its own.
  assert m['moe_dropped'].shape == (cfg.num_layers,)


def test_moe_model_learns():
  cfg, state, step = _setup(moe=_moe(), num_layers=2)
  batch = jax.random.randint(jax.random.key(0), (4, 17), 0, cfg.vocab_size, dtype=jnp.int32)
  losses = []
  for _ in range(40):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.4 * losses[0]
  grads_reach_router = np.asarray(state['params']['stack0']['block0']['mlp']['router'])
  assert np.isfinite(grads_reach_router).all()

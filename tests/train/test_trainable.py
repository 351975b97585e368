"""`train.trainable`: only the selected parameters change and carry optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model import sharding
from model.config import ConfigError
from tests.conftest import tiny_model_config, tiny_train_config
from train import optim, state as state_lib, step as step_lib, trainable


def _setup(pattern):
  cfg = tiny_train_config('unused', lr=1e-2, warmup_steps=1)
  model_cfg = tiny_model_config()
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  rules = sharding.check_rules(cfg.mesh.rules)
  tx, schedule = optim.make_optimizer(cfg.train, 10)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules, pattern)
  state = state_lib.init_state(spec, model_cfg, tx, seed=0)
  step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule,
                                          trainable_mask=spec.trainable_mask))
  tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, model_cfg.vocab_size, jnp.int32)
  return spec, state, step, tokens


def test_only_the_selected_weights_change_and_have_optimizer_state():
  pattern = r'stack0/block0/attn/w_q$'
  spec, state, step, tokens = _setup(pattern)
  before = jax.tree_util.tree_flatten_with_path(jax.device_get(state['params']))[0]
  new_state, metrics = step(state, tokens)
  new_state, metrics = step(new_state, tokens)   # The first step's warmup lr is 0.
  after = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(new_state['params']))[0])
  changed = [trainable.path_name(p) for p, v in before if not np.array_equal(v, after[p])]
  assert changed == ['stack0/block0/attn/w_q'] and np.isfinite(metrics['loss'])
  # Adam's moments exist for that one weight only.
  mu = [s.mu for s in jax.tree.leaves(new_state['opt_state'], is_leaf=lambda x: hasattr(x, 'mu'))
        if hasattr(s, 'mu')][0]
  assert [trainable.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(mu)[0]] == [
      'stack0/block0/attn/w_q']


def test_all_trainable_is_the_plain_step():
  _, state, step, tokens = _setup('')
  full, _ = step(state, tokens)
  n_opt = len(jax.tree.leaves(full['opt_state']))
  assert n_opt >= 2 * len(jax.tree.leaves(state['params']))   # mu and nu for every parameter.


def test_a_pattern_matching_nothing_is_refused():
  with pytest.raises(ConfigError, match=r"config\.train\.trainable='nothing_here' matches no "
                                        r'parameter; paths look like'):
    _setup('nothing_here')
  with pytest.raises(ConfigError, match='not a regular expression'):
    _setup('(')


def test_split_and_merge_round_trip():
  params = {'a': {'w': jnp.ones(2), 'b': jnp.zeros(3)}, 'c': jnp.arange(4)}
  mask = trainable.make_mask(params, r'^a/w$|^c$')
  train_p, frozen_p = trainable.split(params, mask)
  assert jax.tree.leaves(frozen_p)[0].shape == (3,)
  merged = trainable.merge(train_p, frozen_p)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), merged, params))
  assert optax.tree_utils.tree_l2_norm(train_p) > 0

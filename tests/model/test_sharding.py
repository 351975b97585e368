import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding, transformer
from tests.conftest import random_tokens, tiny_model_config
from train import state as state_lib
from train import optim
import ml_collections


def test_rules_are_checked():
  with pytest.raises(sharding.ShardingError, match="maps logical axis 'embed' twice"):
    sharding.check_rules([('embed', 'fsdp'), ('embed', None)])
  with pytest.raises(sharding.ShardingError, match="unknown mesh axis 'model'"):
    sharding.check_rules([('embed', 'model')])
  rules = sharding.check_rules(sharding.DEFAULT_RULES)
  with pytest.raises(sharding.ShardingError, match="'nonesuch' has no rule"):
    sharding.logical_to_spec(('nonesuch',), rules)


def test_mesh_sizes_must_multiply_to_device_count():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh({'data': -1, 'tensor': 2}).shape) == {'data': 4, 'fsdp': 1, 'tensor': 2}
  with pytest.raises(sharding.ShardingError, match='multiply to 6, but there are 8 devices'):
    sharding.make_mesh({'data': 3, 'tensor': 2})
  with pytest.raises(sharding.ShardingError, match='only one axis may be -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})
  with pytest.raises(sharding.ShardingError, match='unknown axes'):
    sharding.make_mesh({'expert': 8})


def test_no_mesh_axis_used_twice_and_indivisible_dims_replicate():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sharding.check_rules([('a', 'fsdp'), ('b', ('fsdp', 'tensor')), ('c', 'tensor')])
  assert sharding.logical_to_spec(('a', 'b'), rules, (4, 4), mesh) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('c', 'a'), rules, (3, 4), mesh) == P(None, 'fsdp')


def test_sharded_forward_and_grads_equal_unsharded():
  cfg = tiny_model_config(num_heads=4, num_kv_heads=2, num_layers=2)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sharding.check_rules(sharding.DEFAULT_RULES)
  train_cfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, lr_end_fraction=0.1, b1=0.9,
                                             b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=0.0))
  tx, _ = optim.make_optimizer(train_cfg, 10)
  spec = state_lib.make_state_spec(cfg, tx, mesh, rules)
  state = state_lib.init_state(spec, cfg, tx, seed=0)
  w_up = state['params']['stack0']['block0']['mlp']['w_up']
  assert w_up.sharding.spec == P(None, 'fsdp', 'tensor')  # [layers, embed, mlp]
  assert len({str(s.index) for s in w_up.addressable_shards}) == 4
  assert w_up.addressable_shards[0].data.shape == (2, 16, 24)

  plain = nnx.state(transformer.build(cfg, seed=0)).to_pure_dict()
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(state['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-6)  # Sharded init writes the same values.

  tokens = random_tokens(0, (8, 12), cfg.vocab_size)

  def loss(p, t):
    return jnp.mean(nnx.merge(spec.graphdef, p)(t)[0] ** 2)

  ref = jax.jit(jax.value_and_grad(loss))(plain, tokens)
  tok_sh = NamedSharding(mesh, P(('data', 'fsdp'), None))
  with sharding.use_mesh(mesh, rules):
    got = jax.jit(jax.value_and_grad(loss), in_shardings=(spec.param_shardings, tok_sh))(
        state['params'], jax.device_put(tokens, tok_sh))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

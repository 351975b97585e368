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
  with pytest.raises(sharding.ShardingError, match='lists a mesh axis twice'):
    sharding.check_rules([('batch', ('data', 'data'))])
  rules = sharding.check_rules(sharding.DEFAULT_RULES)
  with pytest.raises(sharding.ShardingError, match="'nonesuch' has no rule"):
    sharding.logical_to_spec(('nonesuch',), rules)


def test_mesh_sizes_must_multiply_to_device_count():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh({'data': -1, 'tensor': 2}).shape) == {
      'data': 4, 'pipeline': 1, 'fsdp': 1, 'expert': 1, 'sequence': 1, 'tensor': 2}
  with pytest.raises(sharding.ShardingError, match='multiply to 6, but there are 8 devices'):
    sharding.make_mesh({'data': 3, 'tensor': 2})
  with pytest.raises(sharding.ShardingError, match='only one axis may be -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})
  with pytest.raises(sharding.ShardingError, match='unknown axes'):
    sharding.make_mesh({'model': 8})
  with pytest.raises(sharding.ShardingError, match='must be positive'):
    sharding.make_mesh({'data': 0})


def test_mesh_axis_used_twice_in_one_tensor_is_an_error_and_indivisible_dims_replicate():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sharding.check_rules([('a', 'fsdp'), ('b', ('fsdp', 'tensor')), ('c', 'tensor')])
  with pytest.raises(sharding.ShardingError, match="'a' and 'b' .* both to mesh axis 'fsdp'"):
    sharding.logical_to_spec(('a', 'b'), rules, (4, 4), mesh)
  with pytest.raises(sharding.ShardingError, match="both to mesh axis 'fsdp'"):
    sharding.logical_to_spec(('a', 'b'), rules)  # Whatever the sizes: fails on 1 device too.
  assert sharding.logical_to_spec(('c', 'a'), rules, (3, 4), mesh) == P(None, 'fsdp')
  assert sharding.logical_to_spec(('b',), rules, (4,), mesh) == P(('fsdp', 'tensor'))


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


def test_default_rules_cover_the_new_axes():
  mesh = sharding.make_mesh({'data': 1, 'pipeline': 2, 'expert': 2, 'sequence': 2})
  rules = sharding.check_rules(sharding.DEFAULT_RULES)
  spec = lambda names, shape: sharding.logical_to_spec(names, rules, shape, mesh)
  # Experts on the expert axis, and non-MoE compute data-parallel over it.
  assert spec(('layers', 'expert', 'embed', 'mlp'), (4, 4, 8, 8)) == P('pipeline', 'expert', None, None)
  assert spec(('batch', 'length', 'act_embed'), (8, 6, 8)) == P('expert', 'sequence', None)
  assert spec(('stage', None, 'embed'), (2, 2, 8)) == P('pipeline', None, None)
  # Every logical name the model uses has a rule in every preset (an unmapped name is an error).
  names = {n for n, _ in sharding.DEFAULT_RULES}
  for preset in sharding.PRESETS.values():
    assert {n for n, _ in preset.rules} == names
    sharding.check_rules(preset.rules)


def test_presets_fill_their_axis_and_reject_axes_they_do_not_use():
  sizes = lambda mesh_cfg: {a: s for a, s in sharding.mesh_from_config(mesh_cfg)[0].shape.items()
                            if s > 1}
  assert sizes({'preset': 'data'}) == {'data': 8}
  assert sizes({'preset': 'fsdp', 'data': -1}) == {'fsdp': 8}   # -1 elsewhere: the preset fills.
  assert sizes({'preset': 'fsdp_tensor', 'tensor': 2}) == {'fsdp': 4, 'tensor': 2}
  assert sizes({'preset': 'tensor_sequence', 'tensor': 2, 'sequence': 2}) == {
      'data': 2, 'tensor': 2, 'sequence': 2}
  assert sizes({'preset': 'expert', 'data': 2}) == {'data': 2, 'expert': 4}
  assert sizes({'preset': 'fsdp', 'pipeline': 2}) == {'pipeline': 2, 'fsdp': 4}  # Any preset + pipeline.
  mesh, rules = sharding.mesh_from_config({'preset': 'fsdp', 'rules': (('embed', 'tensor'),)})
  assert rules['embed'] == ('fsdp',) and rules['batch'] == ('data', 'fsdp')  # Preset rules win.
  with pytest.raises(sharding.ShardingError, match=r"config.mesh.tensor=2, but preset 'fsdp'"):
    sharding.mesh_from_config({'preset': 'fsdp', 'tensor': 2})
  with pytest.raises(sharding.ShardingError, match="config.mesh.preset='zero'; expected one of"):
    sharding.mesh_from_config({'preset': 'zero'})
  with pytest.raises(sharding.ShardingError, match='not divisible by the fixed axes product 16'):
    sharding.mesh_from_config({'preset': 'fsdp_tensor', 'tensor': 16})


def test_dcn_sizes_multiply_in_and_each_slice_is_one_contiguous_block():
  ici, dcn = sharding.mesh_shape({'fsdp': -1}, 8, {'data': 2})
  assert (ici['fsdp'], dcn['data']) == (4, 2)
  mesh = sharding.make_mesh({'fsdp': -1, 'tensor': 2}, dcn={'data': 2})
  assert (mesh.shape['data'], mesh.shape['fsdp'], mesh.shape['tensor']) == (2, 2, 2)
  # On CPU, equal blocks of devices stand in for slices: data index i is slice i.
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}
  with pytest.raises(sharding.ShardingError, match='3 slices, which does not divide the 8 devices'):
    sharding.make_mesh({'data': -1}, dcn={'data': 3})
  with pytest.raises(sharding.ShardingError, match='2x2.*multiply to 16'):
    sharding.make_mesh({'data': 2, 'fsdp': 4}, dcn={'data': 2})

  class FakeTpu:  # Devices of two slices, interleaved in the device list.
    def __init__(self, i):
      self.id, self.slice_index, self.process_index, self.platform = i, i % 2, i // 4, 'fake'

  arr = sharding.hybrid_device_array({**dict.fromkeys(sharding.MESH_AXES, 1), 'fsdp': 4},
                                     {**dict.fromkeys(sharding.MESH_AXES, 1), 'data': 2},
                                     [FakeTpu(i) for i in range(8)])
  assert arr.shape == (2, 1, 4, 1, 1, 1)
  assert {d.slice_index for d in arr[0].ravel()} == {0} and {d.slice_index for d in arr[1].ravel()} == {1}


def test_sequence_sharded_activations_equal_unsharded():
  """`length` on the sequence axis: GSPMD inserts the attention collectives."""
  cfg = tiny_model_config(num_layers=2)
  model = transformer.build(cfg, seed=0)
  graphdef, params = nnx.split(model)
  tokens = random_tokens(1, (2, 16), cfg.vocab_size)
  f = lambda p, t: nnx.merge(graphdef, p)(t)[0]
  ref = jax.jit(f)(params, tokens)
  mesh, rules = sharding.mesh_from_config({'preset': 'tensor_sequence', 'tensor': 2, 'sequence': 4})
  with sharding.use_mesh(mesh, rules):
    got = jax.jit(f)(params, tokens)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_unmapped_logical_name_names_the_parameter():
  rules = sharding.check_rules([(n, a) for n, a in sharding.DEFAULT_RULES if n != 'mlp'])
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  with pytest.raises(sharding.ShardingError, match=r"parameter .*'w_down'.*'mlp' has no rule"):
    state_lib.param_shardings(tiny_model_config(), mesh, rules)


def test_process_rows_single_process():
  mesh = sharding.make_mesh({'data': 2, 'pipeline': 2, 'tensor': 2})
  sh = NamedSharding(mesh, P('data', None))
  assert sharding.process_rows(sh, 8) == (0, 1)

"""Sharded training on 8 simulated devices equals the 1-device run: every mesh preset, a custom
data x fsdp x tensor mesh, and pipeline parallelism (GPipe and circular, 2 and 4 stages) give the
same per-step loss and gradients (float32, 1e-5) over several train steps, and the parameters
and optimizer slots are sharded as the rules say."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import pipeline, sharding, transformer
from model.config import MoEConfig
from tests.conftest import random_tokens, tiny_model_config
from train import optim, state as state_lib, step as step_lib

STEPS, BATCH, SEQ = 3, 8, 12
TOL = 1e-5
TRAIN = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, lr_end_fraction=0.1, b1=0.9,
                                       b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=0.0))
DENSE = dict(num_layers=4)
DEEP = dict(num_layers=8)   # Circular with 4 stages x 2 repeats needs 8 layers.
MOE = dict(num_layers=4, moe=MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=16,
                                       dispatch='dropless'))


def _initial_state(model_cfg, tx):
  """The state `init_state(seed=0)` creates, built once eagerly (its sharded init is tested in
  tests/model/test_sharding.py; compiling it again for every mesh would dominate these tests)."""
  key = repr(model_cfg)
  if key not in _INIT:
    params = nnx.state(transformer.build(model_cfg, seed=0)).to_pure_dict()
    _INIT[key] = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32),
                  'rng': jax.random.key_data(jax.random.key(1))}
  return _INIT[key]


_INIT = {}


def _run(model_kw, mesh_cfg, pipe=None, devices=None):
  """STEPS train steps (train/step.py) -> per-step losses, gradients, final state, mesh.

  The gradient of step t is read back from Adam's first moment, g_t = (mu_t - b1 mu_{t-1}) /
  (1 - b1) (no clipping here), so one compiled train step gives both.
  """
  model_cfg = tiny_model_config(**model_kw)
  mesh, rules = sharding.mesh_from_config(mesh_cfg, devices)
  tx, schedule = optim.make_optimizer(TRAIN, 100)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules)
  state = jax.device_put(_initial_state(model_cfg, tx), spec.state_shardings)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules, (BATCH, 1), mesh))
  tokens = [jax.device_put(random_tokens(i, (BATCH, SEQ + 1), model_cfg.vocab_size), batch_sh)
            for i in range(STEPS)]
  with sharding.use_mesh(mesh, rules), pipeline.use_pipeline(pipe):
    step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, z_loss=1e-4),
                   in_shardings=(spec.state_shardings, batch_sh),
                   out_shardings=(spec.state_shardings, NamedSharding(mesh, P())))
    # Optimisation level 0 compiles ~35% faster on CPU; the arithmetic is the same.
    step = step.lower(state, tokens[0]).compile({'xla_backend_optimization_level': 0})
  losses, grads, mu_prev = [], [], None
  for i in range(STEPS):
    state, metrics = step(state, tokens[i])
    losses.append(float(metrics['loss']))
    mu = jax.tree.map(np.asarray, optax.tree_utils.tree_get(state['opt_state'], 'mu'))
    b1 = TRAIN.b1
    grads.append(jax.tree.map(lambda m, p: (m - b1 * p) / (1 - b1), mu,
                              mu_prev if mu_prev is not None else jax.tree.map(np.zeros_like, mu)))
    mu_prev = mu
  return dict(losses=losses, grads=grads, state=state, spec=spec, mesh=mesh)


_REFS = {}


def _reference(model_kw):
  key = repr(sorted(model_kw.items()))
  if key not in _REFS:
    _REFS[key] = _run(model_kw, {'data': 1}, devices=jax.devices()[:1])
  return _REFS[key]


def _assert_same(got, ref):
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=TOL, atol=TOL)
  for step, (g, r) in enumerate(zip(got['grads'], ref['grads'])):
    flat_g, flat_r = jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(r)
    assert len(flat_g) == len(flat_r)
    for (path, a), b in zip(flat_g, flat_r):
      np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL,
                                 err_msg=f'step {step} grad {jax.tree_util.keystr(path)}')
  for a, b in zip(jax.tree.leaves(got['state']['params']), jax.tree.leaves(ref['state']['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


def _assert_sharded(run, path, spec, shard_shape):
  """A parameter and its Adam slots have the expected spec and per-device shard shape."""
  leaf = run['state']['params']
  for k in path:
    leaf = leaf[k]
  assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
  assert leaf.addressable_shards[0].data.shape == shard_shape
  mu = [x for x in jax.tree.leaves(run['state']['opt_state']) if x.shape == leaf.shape]
  assert mu and all(x.sharding.spec == spec for x in mu)


W_UP = ('stack0', 'block0', 'mlp', 'w_up')   # [layers, embed 32, mlp 48]
W_Q = ('stack0', 'block0', 'attn', 'w_q')    # [layers, embed 32, heads 4, head_dim 8]
EMB = ('embedder', 'embedding')              # [vocab 61, embed 32]

CASES = {
    # name: (model, config.mesh, [(param, spec, per-device shard shape)])
    'data': (DENSE, {'preset': 'data'},
             [(W_UP, P(None, None, None), (4, 32, 48)), (EMB, P(None, None), (61, 32))]),
    'fsdp': (DENSE, {'preset': 'fsdp'},
             [(W_UP, P(None, 'fsdp', None), (4, 4, 48)), (EMB, P(None, 'fsdp'), (61, 4))]),
    'fsdp_tensor': (DENSE, {'preset': 'fsdp_tensor', 'tensor': 2},
                    [(W_UP, P(None, 'fsdp', 'tensor'), (4, 8, 24)),
                     (W_Q, P(None, 'fsdp', 'tensor', None), (4, 8, 2, 8))]),
    'tensor_sequence': (DENSE, {'preset': 'tensor_sequence', 'tensor': 2, 'sequence': 2},
                        [(W_UP, P(None, None, 'tensor'), (4, 32, 24)),
                         (W_Q, P(None, None, 'tensor', None), (4, 32, 2, 8))]),
    'expert': (MOE, {'preset': 'expert', 'data': 2},
               [(('stack0', 'block0', 'mlp', 'w_gate'), P(None, 'expert', None, None), (4, 1, 32, 16)),
                (W_Q, P(None, None, None, None), (4, 32, 4, 8))]),
    'data_fsdp_tensor': (DENSE, {'data': 2, 'fsdp': 2, 'tensor': 2},
                         [(W_UP, P(None, 'fsdp', 'tensor'), (4, 16, 24)),
                          (EMB, P(None, 'fsdp'), (61, 16))]),
}


SLOW = {'expert'}  # Building the MoE model eagerly and compiling it twice: ~40 s of CPU.


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(CASES)])
def test_mesh_presets_match_one_device(name):
  model_kw, mesh_cfg, expected = CASES[name]
  got = _run(model_kw, mesh_cfg)
  assert got['mesh'].devices.size == 8
  for path, spec, shard in expected:
    _assert_sharded(got, path, spec, shard)
  _assert_same(got, _reference(model_kw))


PIPE_CASES = {
    # name: (config.mesh, PipelineConfig, remat, w_up spec, w_up shard shape); the stacked
    # layers [8, ...] sit on pipeline in contiguous blocks, FSDP/tensor shard inside a stage.
    'gpipe_2': ({'pipeline': 2, 'fsdp': 2, 'data': 2}, pipeline.PipelineConfig(2, 2, 'gpipe'),
                'none', P('pipeline', 'fsdp', None), (4, 16, 48)),
    'gpipe_4': ({'pipeline': 4, 'data': 2}, pipeline.PipelineConfig(4, 4, 'gpipe'),
                'full', P('pipeline', None, None), (2, 32, 48)),
    'circular_2': ({'pipeline': 2, 'fsdp': 2, 'tensor': 2},
                   pipeline.PipelineConfig(2, 4, 'circular', 2),
                   'full', P('pipeline', 'fsdp', 'tensor'), (4, 16, 24)),
    'circular_4': ({'pipeline': 4, 'fsdp': 2}, pipeline.PipelineConfig(4, 4, 'circular', 2),
                   'none', P('pipeline', 'fsdp', None), (2, 16, 48)),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(PIPE_CASES))
def test_pipeline_matches_one_device(name):
  mesh_cfg, pipe, remat, spec, shard = PIPE_CASES[name]
  got = _run(dict(DEEP, remat=remat), mesh_cfg, pipe)
  _assert_sharded(got, W_UP, spec, shard)
  # Remat does not change the numbers: one plain 1-device reference serves both.
  _assert_same(got, _reference(DEEP))


def test_pipeline_stage_hand_off_is_a_collective_permute():
  """The compiled pipelined forward moves activations between stages with collective-permutes."""
  cfg = tiny_model_config(**DEEP)
  mesh, rules = sharding.mesh_from_config({'pipeline': 4, 'data': 2})
  spec = state_lib.make_state_spec(cfg, optim.make_optimizer(TRAIN, 10)[0], mesh, rules)
  loss_fn = step_lib.make_loss_fn(spec.graphdef, 0.0)
  batch_sh = NamedSharding(mesh, P('data'))
  with sharding.use_mesh(mesh, rules), pipeline.use_pipeline(pipeline.PipelineConfig(4, 4)):
    hlo = jax.jit(lambda p, t: loss_fn(p, t)[0], in_shardings=(spec.param_shardings, batch_sh)).lower(
        spec.abstract_params, jax.ShapeDtypeStruct((BATCH, SEQ + 1), jnp.int32)).compile().as_text()
  assert 'collective-permute' in hlo

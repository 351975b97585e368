"""Expert parallelism (model/moe_parallel.py) on 8 simulated CPU devices: the sharded layer equals
the unsharded one (outputs, aux stats, gradients), drops follow the documented group semantics,
and bad layouts fail with a clear error."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import moe, moe_parallel, pipeline, sharding
from model.transformer import Decoder
from tests.conftest import random_tokens, tiny_model_config

# batch on (data, fsdp, expert), expert weights on expert, length on sequence, mlp on tensor.
RULES = sharding.check_rules(sharding.DEFAULT_RULES)
AUX_KEYS = ('aux_loss', 'router_z_loss', 'load', 'dropped_fraction', 'router_entropy')

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (simulated) devices')


def _moe(e, k, dispatch, cf, group='batch', shared=0, seed=0, **model_kw):
  mcfg = moe.MoEConfig(num_experts=e, top_k=k, expert_mlp_dim=16, dispatch=dispatch,
                       capacity_factor=cf, capacity_group=group, num_shared_experts=shared)
  return moe.MoE(tiny_model_config(**model_kw), mcfg, nnx.Rngs(seed))


def _run(m, x, mesh=None, grads=True):
  """(y, aux, grads wrt (params, x), compiled HLO text); under `mesh` if given."""
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  ct = jax.random.normal(jax.random.key(42), x.shape)  # A fixed random output cotangent.

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * ct) + aux['aux_loss'] + aux['router_z_loss'], (y, aux)

  f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True) if grads else (
      lambda p, x: ((None, loss(p, x)[1]), None))
  if mesh is None:
    compiled = jax.jit(f).lower(params, x).compile()
  else:
    with sharding.use_mesh(mesh, RULES):
      compiled = jax.jit(f).lower(params, x).compile()
  (_, (y, aux)), g = compiled(params, x)
  return y, aux, g, compiled.as_text()


def _assert_close(a, b, rtol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u), np.asarray(v)
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * max(1e-1, float(np.abs(v).max())))


@pytest.mark.parametrize('dispatch,k,e,cf,group,mesh_shape,activation,shared', [
    # One group per sequence and sequences stay whole on a device: even the drops are identical.
    ('capacity', 1, 8, 0.5, 'sequence', dict(data=2, expert=4), 'swiglu', 0),
    # capacity_factor = E: nothing drops. Experts' F split on tensor; a shared expert.
    ('capacity', 2, 8, 8.0, 'batch', dict(expert=4, tensor=2), 'swiglu', 1),
    ('dropless', 2, 8, 1.0, 'batch', dict(expert=8), 'swiglu', 0),   # One expert per device.
    # T split on sequence; a plain GELU FFN (no w_up); two experts per device.
    ('dropless', 1, 16, 1.0, 'batch', dict(expert=2, sequence=2, tensor=2), 'gelu', 0),
])
def test_expert_parallel_equals_unsharded(dispatch, k, e, cf, group, mesh_shape, activation,
                                          shared):
  m = _moe(e, k, dispatch, cf, group=group, shared=shared, activation=activation)
  x = jax.random.normal(jax.random.key(1), (8, 8, 32))
  y0, aux0, g0, hlo0 = _run(m, x)
  y1, aux1, g1, hlo1 = _run(m, x, sharding.make_mesh(mesh_shape))
  assert 'all-to-all' in hlo1 and 'all-to-all' not in hlo0  # The expert-parallel path ran.
  _assert_close(y1, y0)
  for key in AUX_KEYS:
    _assert_close(aux1[key], aux0[key])
  assert (float(aux1['dropped_fraction']) > 0.2) == (cf < 1)
  _assert_close(g1, g0)  # wrt x, router, w_gate, (w_up), w_down (and the shared expert).
  assert float(jnp.abs(g1[0]['router'][...]).max()) > 0


def test_batch_group_is_each_devices_tokens():
  # capacity_group='batch' under EP: each device's tokens form one group (GShard), C = capacity(n).
  # With one row per device that is exactly the unsharded layer with one group per sequence.
  m = _moe(8, 2, 'capacity', 0.5, group='batch')
  x = jax.random.normal(jax.random.key(3), (8, 8, 32))
  y1, aux1, _, hlo1 = _run(m, x, sharding.make_mesh(dict(expert=8)), grads=False)
  assert 'all-to-all' in hlo1
  per_row = _moe(8, 2, 'capacity', 0.5, group='sequence')
  nnx.update(per_row, nnx.state(m))
  y_seq, aux_seq, _, _ = _run(per_row, x, grads=False)
  y_glob, aux_glob, _, _ = _run(m, x, grads=False)
  assert float(aux_seq['dropped_fraction']) > 0.2
  _assert_close(aux1['dropped_fraction'], aux_seq['dropped_fraction'])
  _assert_close(y1, y_seq)
  # The documented difference: one global group ranks slots across rows, so other slots drop.
  assert not np.allclose(y1, y_glob, atol=1e-4)


def test_num_experts_not_divisible_by_expert_axis():
  x = jnp.zeros((8, 4, 32))
  with sharding.use_mesh(sharding.make_mesh(dict(expert=4, data=2)), RULES):
    with pytest.raises(sharding.ShardingError,
                       match=r"config\.model\.moe\.num_experts=6 .* 4 .*'expert'"):
      jax.eval_shape(lambda x: _moe(6, 2, 'dropless', 1.0)(x), x)  # Traced only: no compile.


def test_active_plan_layouts():
  e8 = moe.MoEConfig(num_experts=8, expert_mlp_dim=16, dispatch='dropless')
  assert moe_parallel.active_plan(e8, 8, 4) is None  # No mesh.
  with sharding.use_mesh(sharding.make_mesh(dict(data=8)), RULES):
    assert moe_parallel.active_plan(e8, 8, 4) is None  # No expert axis.
  mesh = sharding.make_mesh(dict(data=2, expert=2, sequence=2))
  with sharding.use_mesh(mesh, RULES):
    p = moe_parallel.active_plan(e8, 8, 4)
    assert (p.expert_axis, p.batch_axes, p.length_axes, p.mlp_axes) == (
        'expert', ('data', 'expert'), ('sequence',), ())
    assert moe_parallel.active_plan(e8, 2, 4) is None     # 2 rows on 4 batch shards: fallback.
    assert moe_parallel.active_plan(e8, 8, 1).length_axes == ()  # One decode step.
    seq = dataclasses.replace(e8, dispatch='capacity', capacity_group='sequence')
    assert moe_parallel.active_plan(seq, 8, 4).length_axes == ()  # Groups stay whole.
  # Batch not on the expert axis in the rules: tokens are split over it anyway.
  rules = {**RULES, 'batch': ('data',)}
  with sharding.use_mesh(sharding.make_mesh(dict(data=2, expert=2, tensor=2)), rules):
    p = moe_parallel.active_plan(e8, 8, 4)
    assert (p.batch_axes, p.mlp_axes) == (('data', 'expert'), ('tensor',))


@pytest.mark.slow  # Two compiles of a Decoder gradient each.
@pytest.mark.parametrize('dispatch,mesh_shape,stages', [
    ('capacity', dict(data=2, expert=4), 0),
    ('dropless', dict(pipeline=2, expert=4), 2),  # Inside the pipeline's vmap over stages.
])
def test_decoder_jit_on_expert_mesh(dispatch, mesh_shape, stages):
  """The full scanned + rematerialised Decoder: loss, aux and gradients equal with/without EP."""
  mcfg = moe.MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=16, dispatch=dispatch,
                       capacity_factor=4.0)
  cfg = tiny_model_config(num_layers=max(1, stages), moe=mcfg, remat='full')
  # Differentiate the whole state as the train step does (the router bias just gets a 0 grad).
  graphdef, state = nnx.split(Decoder(cfg, nnx.Rngs(0)))
  tokens = random_tokens(5, (8, 8), cfg.vocab_size)

  def loss(state):
    logits, _, aux = nnx.merge(graphdef, state).forward(tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), aux

  # The pipeline computes the aux stats per microbatch, so the reference runs pipelined too.
  pcfg = pipeline.PipelineConfig(stages=stages, microbatches=stages) if stages else None
  with pipeline.use_pipeline(pcfg):
    (l0, aux0), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  f = jax.jit(jax.value_and_grad(loss, has_aux=True))
  mesh = sharding.make_mesh(mesh_shape)
  shard = lambda v, s: jax.device_put(v, jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(tuple(s), RULES, v.shape, mesh)))
  state_sh = jax.tree.map(shard, state, nnx.get_partition_spec(state))
  assert state_sh['stack0']['block0']['mlp']['w_gate'][...].sharding.spec[1] == 'expert'
  with sharding.use_mesh(mesh, RULES), pipeline.use_pipeline(pcfg):
    compiled = f.lower(state_sh).compile()
  assert 'all-to-all' in compiled.as_text()
  (l1, aux1), g1 = compiled(state_sh)
  _assert_close(l1, l0)
  _assert_close(aux1, aux0)
  _assert_close(g1, g0)

"""PPO's loss written out from its equations (Schulman et al. 2017 with TRL PPOTrainer's value
clipping and masked means) against train/objectives/ppo.py, and the GRPO and PPO losses and
updates on 8 simulated devices equal to 1 device."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import heads, sharding
from model.peft import methods as peft_lib
from tests.conftest import tiny_model_config
from train import objectives, optim, state as state_lib, step as step_lib, trainable
from train.align_config import AlignConfig
from train.run import rows_sharding
from train.step import ModelForward

ROWS, SEQ, STEPS = 8, 20, 3


def _batches(objective: str, vocab=60, steps=STEPS, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    tokens = rng.integers(3, vocab, (ROWS, SEQ + 1)).astype(np.int32)
    mask = np.zeros((ROWS, SEQ), np.float32)
    for r in range(ROWS):
      mask[r, int(rng.integers(2, 8)):int(rng.integers(10, SEQ))] = 1
    b = {'tokens': tokens, 'loss_mask': mask,
         'old_logps': (-4.0 + 0.3 * rng.normal(size=(ROWS, SEQ))).astype(np.float32) * mask}
    if objective == 'ppo':
      b.update(advantages=(rng.normal(size=(ROWS, SEQ)) * mask).astype(np.float32),
               returns=(rng.normal(size=(ROWS, SEQ)) * mask).astype(np.float32),
               old_values=(0.3 * rng.normal(size=(ROWS, SEQ)) * mask).astype(np.float32))
    else:
      b['advantages'] = rng.normal(size=ROWS).astype(np.float32)
    out.append(b)
  return out


def test_ppo_loss_equals_its_equations():
  cfg = tiny_model_config(num_layers=2, heads=('value',))
  model = peft_lib.build_model(cfg, None, seed=0)
  a = AlignConfig(clip_eps=0.2, vf_clip=0.2, vf_coef=0.1, temperature=0.8)
  b = _batches('ppo', steps=1)[0]
  got, metrics = objectives.get('ppo')(None, a).loss(ModelForward(model), jax.tree.map(jnp.asarray, b))
  # The same quantities in numpy, one equation per line.
  x, _, _ = model.forward(jnp.asarray(b['tokens'][:, :-1]), hidden=True)
  logits = np.asarray(model.embedder.decode(x), np.float64) / a.temperature
  logp_all = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  logp = np.take_along_axis(logp_all, b['tokens'][:, 1:, None], -1)[..., 0]
  values = np.asarray(heads.score(model, x, 'value'), np.float64)
  m = b['loss_mask'].astype(bool)
  ratio = np.exp(logp - b['old_logps'])
  pg_losses = -b['advantages'] * ratio
  pg_losses2 = -b['advantages'] * np.clip(ratio, 1 - 0.2, 1 + 0.2)
  pg_loss = np.maximum(pg_losses, pg_losses2)[m].mean()
  vpredclipped = np.clip(values, b['old_values'] - 0.2, b['old_values'] + 0.2)
  vf_losses1 = (values - b['returns']) ** 2
  vf_losses2 = (vpredclipped - b['returns']) ** 2
  vf_loss = 0.5 * np.maximum(vf_losses1, vf_losses2)[m].mean()
  want = pg_loss + 0.1 * vf_loss
  assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
  assert float(metrics['policy_loss']) == pytest.approx(pg_loss, rel=1e-5, abs=1e-6)
  assert float(metrics['value_loss']) == pytest.approx(vf_loss, rel=1e-5, abs=1e-6)
  assert float(metrics['clip_fraction']) == pytest.approx((pg_losses2 > pg_losses)[m].mean(),
                                                          abs=1e-6)


def _rl_steps(objective_name, mesh_cfg, devices, batches):
  model_cfg = tiny_model_config(num_layers=2, heads=('value',) if objective_name == 'ppo' else ())
  mesh, rules = sharding.mesh_from_config(mesh_cfg, devices)
  tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=1, lr_end_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      clip_norm=0.0)), 100)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules)
  params = nnx.state(peft_lib.build_model(model_cfg, None, seed=0)).to_pure_dict()
  ref = jax.tree.map(lambda x: x * 1.01, params)   # A reference that is not the policy.
  state = {'params': params, 'opt_state': tx.init(trainable.split(params, spec.trainable_mask)[0]),
           'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key_data(jax.random.key(1))}
  state = jax.device_put(state, spec.state_shardings)
  ref = jax.device_put(ref, spec.param_shardings)
  objective = objectives.get(objective_name)(None, AlignConfig(kl_coef=0.04, clip_eps=0.2))
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules, (ROWS, 1), mesh))
  fields_sh = {k: rows_sharding(batch_sh, 1 if k in objective.row_fields else 2)
               for k in objective.batch_fields()}
  uses_ref = objective.needs_reference and objective_name == 'grpo'   # PPO's KL is in its reward.
  with sharding.use_mesh(mesh, rules):
    step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, objective=objective,
                                            trainable_mask=spec.trainable_mask),
                   in_shardings=(spec.state_shardings, fields_sh, spec.param_shardings),
                   out_shardings=(spec.state_shardings, NamedSharding(mesh, P())))
    metrics = []
    for b in batches:
      state, m = step(state, {k: jax.device_put(v, fields_sh[k]) for k, v in b.items()}, ref)
      metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
  assert uses_ref == ('kl' in metrics[0])
  return metrics, jax.tree.map(np.asarray, state['params'])


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['grpo', 'ppo'])
def test_rl_losses_on_8_devices_equal_1_device(objective):
  batches = _batches(objective)
  one = _rl_steps(objective, {'data': 1}, jax.devices()[:1], batches)
  eight = _rl_steps(objective, {'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices(), batches)
  assert one[0][-1]['loss'] != one[0][0]['loss']
  keys = ('loss', 'grad_norm', 'clip_fraction', 'entropy') + (
      ('kl',) if objective == 'grpo' else ('value_loss',))
  for a, b in zip(one[0], eight[0]):
    for k in keys:
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k
  for a, b in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

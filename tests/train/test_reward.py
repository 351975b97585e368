"""Reward models through the real trainer: the Bradley–Terry model learns held-out preferences,
its workdir scores (prompt, completion) pairs exactly as training read them, pointwise scores
regress, and 8 simulated devices equal 1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding
from model.peft import methods as peft_lib
from tests.conftest import preference_records, tiny_model_config
from train import objectives, optim, state as state_lib, step as step_lib, trainer
from train.align_config import AlignConfig

pytestmark = pytest.mark.slow


def _cfg(base, files, **train):
  from configs import reward
  cfg = reward.get_config(base)
  cfg.data.update(pref_task='', paths=(files[0],), pref_val_paths=(files[1],), seq_len=48)
  cfg.train.update(steps=12, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, eval_every=6,
                   checkpoint_every=6, peak_flops=1e11, tensorboard=False,
                   async_checkpoints=False)
  cfg.train.update(train)
  return cfg


def test_reward_model_learns_and_its_workdir_scores_as_training_read(trained_workdir,
                                                                     preference_files, tmp_path):
  workdir = str(tmp_path / 'rm')
  lines = []
  result = trainer.train(_cfg(trained_workdir[0], preference_files), workdir, log=lines.append)
  acc = [h['eval_accuracy'] for h in result.history if 'eval_accuracy' in h]
  assert acc[-1] >= 0.9 and result.eval['eval_margin'] > 0
  assert any(x.startswith('step') and ' acc ' in x for x in lines)
  from train.reward_scorer import RewardScorer
  scorer = RewardScorer.from_workdir(workdir)
  recs = [r for r in preference_records(16, offset=500) if 'chosen' in r]
  chosen = scorer.score([(r['prompt'], r['chosen']) for r in recs])
  rejected = scorer.score([(r['prompt'], r['rejected']) for r in recs])
  assert np.mean(chosen > rejected) >= 0.9
  # The same numbers as the objective's own reading of the training rows.
  from train import preference_data as pd
  from train.objectives.reward import pair_rewards
  from train.step import ModelForward
  units = [u for r in recs for u in pd.record_units(r, scorer.tokenizer, scorer.chat, 'x')]
  streams, _ = pd.lay_out(units, 48, scorer.tokenizer.pad_id)
  fields = pd.unit_fields(streams['tokens'].reshape(len(units), -1),
                          {k: v.reshape(len(units), -1) for k, v in streams.items()
                           if k != 'tokens'})
  rc, rr = pair_rewards(ModelForward(nnx.merge(scorer.graphdef, scorer.params)), fields)
  np.testing.assert_allclose(chosen, rc, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rejected, rr, rtol=1e-5, atol=1e-5)


def test_scorer_refuses_a_model_without_a_reward_head(trained_workdir):
  from train.reward_scorer import RewardScorer
  with pytest.raises(ValueError, match="no 'reward' head"):
    RewardScorer.from_workdir(trained_workdir[0])


def _reward_batch(rng, rows, seq, vocab=60, pointwise=0):
  b = {}
  for side in ('', 'rejected_'):
    b[side + 'tokens'] = rng.integers(3, vocab, (rows, seq + 1)).astype(np.int32)
    mask = np.zeros((rows, seq), np.float32)
    for r in range(rows):
      mask[r, int(rng.integers(2, 6)):int(rng.integers(8, seq - 1))] = 1
    b[side + 'loss_mask'] = mask
  b['pair'] = np.asarray([0.0] * pointwise + [1.0] * (rows - pointwise), np.float32)
  b['rejected_loss_mask'][:pointwise] = 0
  b['score'] = rng.normal(0, 1, rows).astype(np.float32) * (1 - b['pair'])
  b['margin'] = np.where(b['pair'] > 0, rng.uniform(0, 0.5, rows), 0).astype(np.float32)
  return b


def test_mixed_pairs_and_scores_give_the_two_losses():
  """Bradley–Terry over the pairs (with margins) plus squared error over the pointwise rows,
  each a mean over its own rows, computed here from the rewards directly."""
  from train.objectives.reward import RewardModel, pair_rewards
  from train.step import ModelForward
  model = peft_lib.build_model(tiny_model_config(num_layers=1, heads=('reward',)))
  batch = jax.tree.map(jnp.asarray, _reward_batch(np.random.default_rng(1), 8, 15, pointwise=3))
  loss, m = RewardModel(None, AlignConfig()).loss(ModelForward(model), batch)
  rc, rr = map(np.asarray, pair_rewards(ModelForward(model), batch))
  pair, score, margin = (np.asarray(batch[k]) for k in ('pair', 'score', 'margin'))
  bt = np.mean(np.logaddexp(0, -(rc - rr - margin))[pair > 0])
  mse = np.mean(((rc - score) ** 2)[pair == 0])
  assert float(loss) == pytest.approx(bt + mse, rel=1e-5)
  assert float(m['accuracy']) == pytest.approx(np.mean((rc > rr)[pair > 0]))


def _reward_steps(mesh_cfg, devices, batches):
  model_cfg = tiny_model_config(num_layers=2, heads=('reward',))
  mesh, rules = sharding.mesh_from_config(mesh_cfg, devices)
  import ml_collections
  tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=1, lr_end_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      clip_norm=0.0)), 100)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules)
  params = nnx.state(peft_lib.build_model(model_cfg, seed=0)).to_pure_dict()
  state = jax.device_put({'params': params, 'opt_state': tx.init(params),
                          'step': jnp.zeros((), jnp.int32),
                          'rng': jax.random.key_data(jax.random.key(1))}, spec.state_shardings)
  rows = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules, (8, 1), mesh))
  from train.run import rows_sharding
  objective = objectives.get('reward')(None, AlignConfig(reward_center=0.01))
  fields_sh = {k: rows_sharding(rows, 1 if k in objective.row_fields else 2)
               for k in objective.batch_fields()}
  with sharding.use_mesh(mesh, rules):
    step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, objective=objective),
                   in_shardings=(spec.state_shardings, fields_sh),
                   out_shardings=(spec.state_shardings, NamedSharding(mesh, P())))
    out = []
    for b in batches:
      state, m = step(state, jax.device_put(b, fields_sh))
      out.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
  return out, jax.tree.map(np.asarray, state['params'])


def test_reward_on_8_devices_equals_1_device():
  rng = np.random.default_rng(0)
  batches = [_reward_batch(rng, 8, 23, pointwise=2) for _ in range(3)]
  one = _reward_steps({'data': 1}, jax.devices()[:1], batches)
  eight = _reward_steps({'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices(), batches)
  assert one[0][-1]['loss'] != one[0][0]['loss']
  for a, b in zip(one[0], eight[0]):
    for k in ('loss', 'grad_norm', 'accuracy', 'margin'):
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k
  for a, b in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_empty_sample_is_scored_and_an_unreadable_one_fails_alone(trained_workdir,
                                                                     preference_files, tmp_path):
  """A sample that stopped at once reads as prompt + EOS; one that cannot be a response at all
  fails that sample (logged by best-of-N), never the batch."""
  workdir = str(tmp_path / 'rm')
  trainer.train(_cfg(trained_workdir[0], preference_files, steps=1, eval_every=1,
                     checkpoint_every=1), workdir, log=lambda *_: None)
  from train import rewards
  score = rewards.make_scorer(f'reward:{workdir}')
  scores, failures = score(['def f(x):\n', 'def g(x):\n', 'def h(x):\n'],
                           ['', '    return x\n', ['not', 'text']])
  assert scores[0] is not None and scores[1] is not None and scores[2] is None
  assert [f.index for f in failures] == [2]

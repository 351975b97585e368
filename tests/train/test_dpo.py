"""DPO through the real trainer: it learns the preference, resumes exactly against a reference
reloaded and verified from its base, LoRA-DPO's reference is the base with the adapters off (no
copy), and 8 simulated devices equal 1 for the DPO loss and its gradients."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding
from model.peft import methods as peft_lib
from model.peft.methods import PeftConfig
from tests.conftest import tiny_model_config, tree_digest
from train import checkpoint as ckpt_lib, objectives, optim, state as state_lib
from train import step as step_lib, trainable, trainer
from train.align_config import AlignConfig

pytestmark = pytest.mark.slow


def _cfg(base, files, **train):
  from configs import dpo
  cfg = dpo.get_config(base)
  cfg.data.update(pref_task='', paths=(files[0],), pref_val_paths=(files[1],), seq_len=48)
  cfg.align.update(beta=0.5)
  cfg.train.update(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, eval_every=3,
                   checkpoint_every=3, eval_tasks='', peak_flops=1e11, tensorboard=False,
                   async_checkpoints=False)
  cfg.train.update(train)
  cfg.sample.update(max_new_tokens=4, num_samples=1)
  return cfg


def _history(result, key):
  return [h[key] for h in result.history if key in h]


def test_dpo_learns_and_resumes_exactly_against_a_verified_reference(trained_workdir,
                                                                     preference_files, tmp_path):
  base = str(tmp_path / 'base')
  shutil.copytree(trained_workdir[0], base)
  straight = str(tmp_path / 'straight')
  lines = []
  result = trainer.train(_cfg(base, preference_files), straight, log=lines.append)
  losses, kl = _history(result, 'loss'), _history(result, 'kl')
  # Step 1: the policy is the reference, so the loss is log 2 and the implicit KL zero.
  assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and kl[0] == pytest.approx(0, abs=1e-5)
  assert losses[-1] < losses[0] - 0.05 and kl[-1] != 0
  assert _history(result, 'rewards/margins')[-1] > 0
  assert result.eval['eval_accuracy'] > 0.5 and result.eval['eval_margin'] > 0
  assert any('acc ' in x and 'kl ' in x for x in lines)   # The progress line shows them.
  from train import checkpoint_stream
  entry = checkpoint_stream.read_record(straight)['reference']
  assert entry['workdir'] == os.path.abspath(base) and entry['step'] == 3

  resumed = str(tmp_path / 'resumed')
  trainer.train(_cfg(base, preference_files), resumed, log=lambda *_: None, stop_after=3)
  second = trainer.train(_cfg(base, preference_files), resumed, log=lambda *_: None)
  from launch.workdir import load_model
  for a, b in zip(jax.tree.leaves(load_model(straight)[3]), jax.tree.leaves(load_model(resumed)[3])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert second.eval['eval_loss'] == pytest.approx(result.eval['eval_loss'], rel=1e-6)

  # The reference's checkpoint changes: resuming against it is refused, nothing written.
  again = str(tmp_path / 'again')
  trainer.train(_cfg(base, preference_files), again, log=lambda *_: None, stop_after=3)
  step_dir = os.path.join(base, 'checkpoints', '3')
  manifest = os.path.join(step_dir, 'palmax_manifest.json')
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
                if f != 'palmax_manifest.json'), key=os.path.getsize)
  with open(victim, 'r+b') as f:   # A flipped bit under an unchanged manifest: corrupt.
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 1]))
  before = tree_digest(again)
  with pytest.raises(ckpt_lib.CheckpointCorruptError):
    trainer.train(_cfg(base, preference_files), again, log=lambda *_: None)
  assert tree_digest(again) == before
  files = json.load(open(manifest))   # Rebuilt with a new manifest: other weights.
  files['files'][os.path.relpath(victim, step_dir)]['sha256'] = '0' * 64
  json.dump(files, open(manifest, 'w'))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match='not the same reference weights'):
    trainer.train(_cfg(base, preference_files), again, log=lambda *_: None)
  assert tree_digest(again) == before


def test_lora_dpo_reference_is_the_base_with_adapters_off(trained_workdir, preference_files,
                                                          tmp_path):
  cfg = _cfg(trained_workdir[0], preference_files, steps=4, eval_every=4, checkpoint_every=4,
             lr=3e-3)
  cfg.peft.update(method='lora', lora_targets=r'attn/w_(q|k|v|o)')
  result = trainer.train(cfg, str(tmp_path / 'lora'), log=lambda *_: None)
  losses = _history(result, 'loss')
  assert losses[0] == pytest.approx(math.log(2), abs=1e-5)   # B = 0: policy == reference.
  assert losses[-1] < losses[0]
  from train import checkpoint_stream
  record = checkpoint_stream.read_record(str(tmp_path / 'lora'))
  assert 'reference' not in record and record['peft_base']['step'] == 3   # No second copy.


STEPS, ROWS, SEQ = 3, 8, 23


def _pair_batches(vocab=60):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    b = {}
    for side in ('', 'rejected_'):
      tokens = rng.integers(3, vocab, (ROWS, SEQ + 1)).astype(np.int32)
      mask = np.zeros((ROWS, SEQ), np.float32)
      for r in range(ROWS):
        start, end = int(rng.integers(2, 8)), int(rng.integers(10, SEQ))
        mask[r, start:end] = 1
      b[side + 'tokens'], b[side + 'loss_mask'] = tokens, mask
    out.append(b)
  return out


def _dpo_steps(mesh_cfg, devices, batches, loss, peft=None):
  model_cfg = tiny_model_config(num_layers=2)
  mesh, rules = sharding.mesh_from_config(mesh_cfg, devices)
  import ml_collections
  tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=1, lr_end_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      clip_norm=0.0)), 100)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules, peft=peft)
  params = nnx.state(peft_lib.build_model(model_cfg, peft, seed=0)).to_pure_dict()
  ref = None
  if peft is None:   # A reference that is not the policy.
    ref = jax.tree.map(lambda a: a * 1.01, params)
  else:
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.01 if 'lora_b' in jax.tree_util.keystr(p) else a, params)
  opt = tx.init(trainable.split(params, spec.trainable_mask)[0])
  state = {'params': params, 'opt_state': opt, 'step': jnp.zeros((), jnp.int32),
           'rng': jax.random.key_data(jax.random.key(1))}
  state = jax.device_put(state, spec.state_shardings)
  if ref is not None:
    ref = jax.device_put(ref, spec.param_shardings)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules, (ROWS, 1), mesh))
  objective = objectives.get('dpo')(None, AlignConfig(beta=0.3, dpo_loss=loss))
  fields_sh = {k: batch_sh for k in objective.batch_fields()}
  with sharding.use_mesh(mesh, rules):
    step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, objective=objective,
                                            trainable_mask=spec.trainable_mask),
                   in_shardings=(spec.state_shardings, fields_sh,
                                 None if ref is None else spec.param_shardings),
                   out_shardings=(spec.state_shardings, NamedSharding(mesh, P())))
    metrics = []
    for b in batches:
      state, m = step(state, jax.device_put(b, batch_sh), ref)
      metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
  return metrics, jax.tree.map(np.asarray, state['params'])


@pytest.mark.parametrize('loss,method', [('sigmoid', 'full'), ('ipo', 'full'), ('sigmoid', 'lora')])
def test_dpo_on_8_devices_equals_1_device(loss, method):
  peft = None if method == 'full' else PeftConfig(method='lora', lora_targets=r'attn/w_\w+')
  batches = _pair_batches()
  one = _dpo_steps({'data': 1}, jax.devices()[:1], batches, loss, peft)
  eight = _dpo_steps({'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices(), batches, loss, peft)
  assert one[0][-1]['loss'] != one[0][0]['loss']
  for a, b in zip(one[0], eight[0]):
    for k in ('loss', 'grad_norm', 'kl', 'rewards/margins'):
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k
  for a, b in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

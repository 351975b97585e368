"""Supervised fine-tuning through the real trainer: it learns, resumes exactly, and a sharded
run equals one device."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding
from model.peft.methods import PeftConfig
from model.peft import methods as peft_lib
from tests.conftest import tiny_model_config, tree_digest
from train import checkpoint as ckpt_lib, objectives, optim, sft_data, state as state_lib
from train import step as step_lib, trainable, trainer

pytestmark = pytest.mark.slow


def _cfg(base, files, **train):
  from configs import sft
  cfg = sft.get_config(base)
  cfg.data.update(sft_task='', paths=(files[0],), sft_val_paths=(files[1],), seq_len=64)
  cfg.train.update(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3,
                   checkpoint_every=3, eval_tasks='', peak_flops=1e11, tensorboard=False,
                   async_checkpoints=False)
  cfg.train.update(train)
  cfg.sample.update(max_new_tokens=4, num_samples=1)
  return cfg


def test_sft_learns_resumes_exactly_and_keeps_its_tokenizer(trained_workdir, sft_files, tmp_path):
  base = trained_workdir[0]
  straight = str(tmp_path / 'straight')
  lines = []
  result = trainer.train(_cfg(base, sft_files), straight, log=lines.append)
  assert any('Initialised parameters from' in x for x in lines)
  evals = [h['eval_loss'] for h in result.history if 'eval_loss' in h]
  losses = [h['loss'] for h in result.history if 'loss' in h]
  assert len(evals) == 2 and evals[1] < evals[0] and losses[-1] < losses[0]
  assert np.isfinite(result.eval['eval_bits_per_byte'])

  resumed = str(tmp_path / 'resumed')
  trainer.train(_cfg(base, sft_files), resumed, log=lambda *_: None, stop_after=3)
  assert ckpt_lib.Checkpointer(resumed).latest_step() == 3
  second = trainer.train(_cfg(base, sft_files), resumed, log=lambda *_: None)
  from launch.workdir import load_model
  pairs = zip(jax.tree.leaves(load_model(straight)[3]), jax.tree.leaves(load_model(resumed)[3]))
  for a, b in pairs:
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert second.eval['eval_loss'] == pytest.approx(result.eval['eval_loss'], rel=1e-6)
  assert os.path.exists(os.path.join(straight, 'tokenizer.model'))


def test_records_refused_before_the_workdir_changes(trained_workdir, sft_files, tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'prompt': 'a', 'completion': 'b'}) + '\n' +
                 json.dumps({'messages': [{'role': 'user', 'content': 'hi'},
                                          {'role': 'assistant', 'content': ''}]}) + '\n')
  workdir = str(tmp_path / 'w')
  with pytest.raises(ValueError, match=rf'{bad}:2: messages\[1\] \(assistant\): content'):
    trainer.train(_cfg(trained_workdir[0], (str(bad), sft_files[1])), workdir,
                  log=lambda *_: None)
  assert not os.path.exists(workdir) or tree_digest(workdir) == {}   # Not a file written.


STEPS, ROWS, SEQ = 3, 8, 31


def _sft_steps(mesh_cfg, devices, batches, peft=None):
  model_cfg = tiny_model_config(num_layers=2)
  mesh, rules = sharding.mesh_from_config(mesh_cfg, devices)
  t = dict(lr=1e-2, warmup_steps=1, lr_end_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
           weight_decay=0.0, clip_norm=0.0)
  import ml_collections
  tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(t), 100)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules, peft=peft)
  params = nnx.state(peft_lib.build_model(model_cfg, peft, seed=0)).to_pure_dict()
  if peft is not None:   # A trained base: LoRA's B starts at zero, so give it something to do.
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.01 if 'lora_b' in jax.tree_util.keystr(p) else a, params)
  opt = tx.init(trainable.split(params, spec.trainable_mask)[0])
  state = {'params': params, 'opt_state': opt, 'step': jnp.zeros((), jnp.int32),
           'rng': jax.random.key_data(jax.random.key(1))}
  state = jax.device_put(state, spec.state_shardings)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules, (ROWS, 1), mesh))
  objective = objectives.get('sft')(None, z_loss=0.0)
  fields_sh = {k: batch_sh for k in objective.batch_fields()}
  with sharding.use_mesh(mesh, rules):
    step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, objective=objective,
                                            trainable_mask=spec.trainable_mask),
                   in_shardings=(spec.state_shardings, fields_sh),
                   out_shardings=(spec.state_shardings, NamedSharding(mesh, P())))
    losses = []
    for b in batches:
      state, m = step(state, jax.device_put(b, batch_sh))
      losses.append(float(m['loss']))
  return losses, jax.tree.map(np.asarray, state['params'])


@pytest.mark.parametrize('method', ['full', 'lora'])
def test_sft_on_8_devices_equals_1_device(method):
  peft = None if method == 'full' else PeftConfig(method='lora', lora_targets=r'(attn|mlp)/w_\w+')
  rng = np.random.default_rng(0)
  exs = [[(rng.integers(3, 60, int(rng.integers(2, 8))).tolist(), False),
          (rng.integers(3, 60, int(rng.integers(1, 6))).tolist(), True)] for _ in range(160)]
  p = sft_data.pack(exs, SEQ, 0)
  rows = p.tokens.reshape(-1, p.window)
  extras = {k: getattr(p, k).reshape(-1, p.window) for k in ('loss', 'segment_ids', 'positions')}
  from train.data import rows_fields
  batches = [rows_fields(rows[i * ROWS:(i + 1) * ROWS],
                         {k: v[i * ROWS:(i + 1) * ROWS] for k, v in extras.items()})
             for i in range(STEPS)]
  assert all(len(b['tokens']) == ROWS for b in batches)
  one = _sft_steps({'data': 1}, jax.devices()[:1], batches, peft)
  eight = _sft_steps({'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices(), batches, peft)
  assert one[0][-1] < one[0][0]
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

"""PEFT through the real trainer: LoRA, adapters and soft prompts train from a base workdir,
checkpoint only what trains, resume exactly, refuse a different base, and serve/evaluate with
the same graph (model/peft/, train/peft_run.py)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tree_digest
from train import checkpoint as ckpt_lib, checkpoint_verify as cv, peft_run, trainer

pytestmark = pytest.mark.slow


def _cfg(base, files, **peft):
  from configs import sft_lora
  cfg = sft_lora.get_config(base)
  cfg.data.update(sft_task='', paths=(files[0],), sft_val_paths=(files[1],), seq_len=64)
  cfg.train.update(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, eval_every=3,
                   checkpoint_every=3, eval_tasks='', peak_flops=1e11, tensorboard=False,
                   async_checkpoints=False)
  cfg.peft.update(peft)
  cfg.sample.update(max_new_tokens=4, num_samples=1)
  return cfg


@pytest.fixture(scope='module')
def lora_run(trained_workdir, sft_files, tmp_path_factory):
  """(straight workdir, its result, the base copy it was trained from)."""
  base = str(tmp_path_factory.mktemp('base') / 'w')
  shutil.copytree(trained_workdir[0], base)
  straight = str(tmp_path_factory.mktemp('lora') / 'w')
  lines = []
  result = trainer.train(_cfg(base, sft_files), straight, log=lines.append)
  assert any('lora trains' in x for x in lines), lines[:3]
  return straight, result, base


def test_lora_learns_and_checkpoints_only_the_adapters(lora_run):
  straight, result, base = lora_run
  evals = [h['eval_loss'] for h in result.history if 'eval_loss' in h]
  assert len(evals) == 2 and evals[1] < evals[0]
  record = ckpt_lib.Checkpointer(straight).read_record()
  assert record[peft_run.BASE_KEY]['workdir'] == os.path.abspath(base)
  assert record[peft_run.BASE_KEY]['step'] == 3
  assert record[peft_run.RECORD_KEY]['method'] == 'lora'
  # Stored arrays: the adapters and their Adam moments, nothing of the frozen base.
  meta = json.loads(open(os.path.join(straight, 'checkpoints', '6', 'state', '_METADATA')).read())
  stored = [k for k, v in meta['tree_metadata'].items()
            if v['value_metadata']['value_type'] != 'None' and 'count' not in k]
  params = [k for k in stored if k.startswith("('params'")]
  assert params and all(k.endswith("'lora_a')") or k.endswith("'lora_b')") for k in stored[1:]
                        if k.startswith("('params'") or "'mu'" in k or "'nu'" in k)
  assert len(params) == 4 * 2   # A and B of the 4 attention weights (2 layers stacked).


def test_lora_resumes_exactly(lora_run, sft_files, tmp_path):
  from launch.workdir import load_model
  straight, result, base = lora_run
  resumed = str(tmp_path / 'resumed')
  trainer.train(_cfg(base, sft_files), resumed, log=lambda *_: None, stop_after=3)
  second = trainer.train(_cfg(base, sft_files), resumed, log=lambda *_: None)
  pairs = zip(jax.tree.leaves(load_model(straight)[3]), jax.tree.leaves(load_model(resumed)[3]))
  for a, b in pairs:
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert second.eval['eval_loss'] == pytest.approx(result.eval['eval_loss'], rel=1e-6)


def test_lora_workdir_serves_its_adapters_on_the_base(lora_run):
  from launch.workdir import load_model
  from model.peft import methods as peft_lib
  from flax import nnx
  straight, _, base = lora_run
  from train.peft_run import config_of
  cfg, model_cfg, graphdef, params, _ = load_model(straight)
  _, _, base_graphdef, base_params, _ = load_model(base)
  model = nnx.merge(graphdef, params)
  w_q = params['stack0']['block0']['attn']['w_q']
  assert w_q['base'].dtype == jnp.bfloat16   # configs/sft_lora.py keeps the base in 16 bits.
  np.testing.assert_array_equal(
      w_q['base'], base_params['stack0']['block0']['attn']['w_q'].astype(jnp.bfloat16))
  assert np.abs(np.asarray(w_q['lora_b'])).max() > 0   # Trained.
  tokens = np.arange(1, 17, dtype=np.int32)[None]
  unmerged = np.asarray(model(tokens)[0])
  peft_lib.merge_peft(model, config_of(cfg))   # In float32, not into the bfloat16 weights.
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(model)))
  merged = np.asarray(model(tokens)[0])
  np.testing.assert_allclose(merged, unmerged, atol=1e-5)
  plain = np.asarray(nnx.merge(base_graphdef, base_params)(tokens)[0])
  assert np.abs(plain - unmerged).max() > 1e-4   # The adapters change the model.


def test_a_different_base_is_refused(lora_run, tmp_path):
  from launch.workdir import load_model
  straight, _, base = lora_run
  moved = str(tmp_path / 'lora')
  shutil.copytree(straight, moved)
  other = str(tmp_path / 'base')
  shutil.copytree(base, other)
  for d in ('checkpoints', ):   # Point the adapters at the copy, then change the copy's weights.
    for step in os.listdir(os.path.join(moved, d)):
      meta = os.path.join(moved, d, step, 'record', 'metadata')
      if os.path.exists(meta):
        rec = json.loads(open(meta).read())
        rec[peft_run.BASE_KEY]['workdir'] = other
        open(meta, 'w').write(json.dumps(rec))
        cv.write_manifest(os.path.join(moved, d, step), int(step))
  load_model(moved)   # Same bytes: accepted.
  step_dir = os.path.join(other, 'checkpoints', '3')
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, 'state'))
                for f in fs), key=os.path.getsize)
  with open(victim, 'r+b') as f:   # Another checkpoint at that step: different, yet verified.
    f.seek(os.path.getsize(victim) // 2)
    f.write(b'\x01\x02\x03\x04')
  cv.write_manifest(step_dir, 3)
  before = tree_digest(moved)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match='not the same base weights'):
    load_model(moved)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match='not the same base weights'):
    trainer.train(_resume_cfg(moved), moved, log=lambda *_: None)
  assert tree_digest(moved) == before


def _resume_cfg(workdir):
  import ml_collections
  cfg = ml_collections.ConfigDict(json.loads(open(os.path.join(workdir, 'config.json')).read()))
  cfg.train.steps = 9
  return cfg


@pytest.mark.parametrize('method', ['adapter', 'prompt'])
def test_adapters_and_soft_prompts_learn_and_evaluate_with_their_graph(method, trained_workdir,
                                                                       sft_files, tmp_path):
  from train.evaluation.lm import PalmaxModel
  workdir = str(tmp_path / method)
  result = trainer.train(_cfg(trained_workdir[0], sft_files, method=method, prompt_tokens=4),
                         workdir, log=lambda *_: None)
  evals = [h['eval_loss'] for h in result.history if 'eval_loss' in h]
  assert evals[1] < evals[0]
  model = PalmaxModel.load(workdir, serve_overrides=dict(num_slots=2, max_queue=4))
  try:
    prefix = model.completer.prefix_ids
    assert len(prefix) == (4 if method == 'prompt' else 0)
    # Scoring (one forward) and the paged engine (prefill + cached decode) agree on the greedy
    # continuation, soft-prompt tokens included.
    from model.inference.completion import CompletionParams
    from model.inference.loop import EngineLoop
    loop = EngineLoop(model.engine).start()
    try:
      c = model.completer.start('def f(x):\n', CompletionParams(max_tokens=4, temperature=0.0,
                                                                 heal=False))
      got = c.choices()[0]
    finally:
      loop.stop()
    ids = model.completer.encode_prompt('def f(x):\n')
    assert ids[:len(prefix)] == prefix
    want, seq = [], list(ids)
    for _ in range(4):   # Greedy by whole-sequence forwards, no cache.
      logits = model.scorer.logits(np.asarray([seq], np.int32))[0, -1]
      want.append(int(np.argmax(logits[:model.tokenizer.vocab_size])))
      seq.append(want[-1])
    assert list(got.token_ids) == want
    # A prompt longer than the context keeps its last tokens after the soft prompt.
    from train.evaluation.lm import Generation
    long = 'x = 1\n' * 100
    fitted = model._fit(long, 8)   # pylint: disable=protected-access
    assert len(model.completer.encode_prompt(fitted)) == model.max_len - 8
    assert len(model.generate([long], Generation(max_tokens=8))[0]) == 1
  finally:
    model.close()

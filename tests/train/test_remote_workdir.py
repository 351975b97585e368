"""A workdir in object storage (`gs://bucket/run`): every palmax read and write goes through
train/paths.py, checked against a local stand-in for the bucket (conftest.fake_bucket), never
the network. Training there resumes exactly like a local workdir, and samples the same text."""
import json
import os

import jax
import numpy as np
import pytest

from tests.conftest import tiny_train_config, write_code_corpus
from train import checkpoint as ckpt_lib
from train import paths, trainer

pytestmark = pytest.mark.slow
RUN = 'gs://bucket/run'


def _params(workdir):
  from launch import workdir as workdir_lib
  return workdir_lib.load_model(workdir)[3]


def _sample(workdir):
  from launch import workdir as workdir_lib
  return workdir_lib.sample_workdir(workdir, prompt='import os', max_new_tokens=6, num_samples=1,
                                    temperature=0.0, top_k=0, top_p=1.0, seed=0)


def test_training_in_a_bucket_matches_a_local_run(fake_bucket, tmp_path):
  glob = write_code_corpus(tmp_path / 'corpus')
  local = str(tmp_path / 'local')
  trainer.train(tiny_train_config(glob, steps=6), local, log=lambda *_: None)

  logs = []
  trainer.train(tiny_train_config(glob, steps=6), RUN, log=logs.append, stop_after=3)
  assert any('not locked' in line for line in logs)   # Object stores have no flock.
  on_disk = fake_bucket(RUN)
  for name in ('config.json', 'tokenizer.model', 'tokenizer.json', 'tokens_train.npy',
               'tokens.json', 'metrics.jsonl', 'checkpoints/3/palmax_manifest.json'):
    assert os.path.isfile(os.path.join(on_disk, name)), name
  assert os.listdir(os.path.join(on_disk, 'tensorboard'))
  assert not os.path.exists(os.path.join(on_disk, 'lock'))
  # Resumed in the bucket: the same parameters, metrics and samples as the local run.
  logs = []
  trainer.train(tiny_train_config(glob, steps=6), RUN, log=logs.append)
  assert any('at step 3' in line for line in logs)
  for a, b in zip(jax.tree.leaves(_params(local)), jax.tree.leaves(_params(RUN))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [json.loads(line)['step'] for line in paths.read_text(f'{RUN}/metrics.jsonl').splitlines()
           if '"loss"' in line]
  assert steps == list(range(1, 7))
  assert _sample(RUN) == _sample(local)


def test_refusals_and_verification_hold_in_a_bucket(fake_bucket, tmp_path):
  glob = write_code_corpus(tmp_path / 'corpus')
  trainer.train(tiny_train_config(glob, steps=3), RUN, log=lambda *_: None)
  ckpt = ckpt_lib.Checkpointer(RUN)
  assert ckpt.latest_verified_step() == 3
  ckpt.close()
  # A refused resume changes nothing in the bucket.
  from tests.conftest import tree_digest
  before = tree_digest(fake_bucket(RUN))
  cfg = tiny_train_config(glob, steps=6)
  cfg.data.seq_len = 16
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r'config\.data\.seq_len=32'):
    trainer.train(cfg, RUN, log=lambda *_: None)
  assert tree_digest(fake_bucket(RUN)) == before
  # A flipped byte in the bucket is refused, naming the step.
  step_dir = os.path.join(fake_bucket(RUN), 'checkpoints', '3')
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  target = max(files, key=os.path.getsize)
  data = bytearray(open(target, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(target, 'wb').write(bytes(data))
  with pytest.raises(ckpt_lib.CheckpointCorruptError, match='step 3 .* corrupt'):
    trainer.train(tiny_train_config(glob, steps=6, on_corrupt='stop'), RUN, log=lambda *_: None)
  with pytest.raises(ckpt_lib.CheckpointCorruptError, match='step 3'):
    _sample(RUN)

"""A workdir is a transaction: a refused run leaves it byte-identical, and nothing is decoded,
resumed or trained against the wrong tokenizer, data, schedule or a second writer.

Each test reproduces a failure reported in issue 10 (see the test names) on a small local corpus.
"""
import json
import os
import shutil

import pytest

from model.config import ConfigError
from tests.conftest import tiny_train_config, tree_digest, write_code_corpus
from train import checkpoint as ckpt_lib
from train import trainer
from train.workdir_lock import WorkdirLock, WorkdirLockedError

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def corpus_glob(trained_workdir):
  return trained_workdir[1]


@pytest.fixture(scope='module')
def trained(trained_workdir):
  """A workdir trained 3 steps (checkpoint at 3); tests copy it before changing anything."""
  return trained_workdir[0]


def _copy(trained, tmp_path):
  dst = str(tmp_path / 'w')
  shutil.copytree(trained, dst)
  return dst


def _refused(cfg, workdir, error, match):
  """Runs the trainer expecting `error` matching `match`; asserts the workdir did not change."""
  before = tree_digest(workdir)
  with pytest.raises(error, match=match) as e:
    trainer.train(cfg, workdir, log=lambda *_: None)
  assert '\n' not in str(e.value)
  assert tree_digest(workdir) == before
  return str(e.value)


def _sample(workdir):
  from launch import workdir as workdir_lib
  return workdir_lib.sample_workdir(workdir, prompt='import os', max_new_tokens=6, num_samples=1,
                                    temperature=0.0, top_k=0, top_p=1.0, seed=0)


def test_refused_vocab_change_keeps_the_tokenizer(trained, corpus_glob, tmp_path):
  # Issue 10, failure 1: the refusal used to retrain and overwrite tokenizer.model and the cache.
  workdir = _copy(trained, tmp_path)
  before = _sample(workdir)
  cfg = tiny_train_config(corpus_glob, steps=6)
  cfg.model.vocab_size = 2048
  _refused(cfg, workdir, ckpt_lib.CheckpointMismatchError, r'model\.vocab_size=512.*2048')
  assert _sample(workdir) == before


def test_data_change_names_the_field(trained, corpus_glob, tmp_path):
  workdir = _copy(trained, tmp_path)
  cfg = tiny_train_config(corpus_glob, steps=6)
  cfg.data.seq_len = 16
  _refused(cfg, workdir, ckpt_lib.CheckpointMismatchError,
           r'checkpoint step 3 .* config\.data\.seq_len=32, but this run has config\.data\.seq_len=16')
  cfg = tiny_train_config(corpus_glob, steps=6)
  cfg.data.tokenizer.train_bytes = 100_000
  _refused(cfg, workdir, ckpt_lib.CheckpointMismatchError, r'config\.data\.tokenizer\.train_bytes')


def test_changed_corpus_is_refused_before_anything_is_written(trained, tmp_path):
  # The same config over different documents (as the stdlib differs between Python versions).
  workdir = _copy(trained, tmp_path)
  glob = write_code_corpus(tmp_path / 'other', n_docs=41)
  cfg = tiny_train_config(glob, steps=6)
  record = ckpt_lib.Checkpointer(workdir).read_record()
  cfg.data.paths = tuple(record['data_config']['paths'])   # Same field values ...
  shutil.copy(os.path.join(os.path.dirname(glob), 'doc040.txt'),
              os.path.join(os.path.dirname(cfg.data.paths[0]), 'doc040.txt'))  # ... one more doc.
  try:
    _refused(cfg, workdir, ckpt_lib.CheckpointMismatchError,
             r"corpus .* differs from the one checkpoint step 3 .* train_docs \d+ then, \d+ now")
  finally:
    os.remove(os.path.join(os.path.dirname(cfg.data.paths[0]), 'doc040.txt'))


def test_wrong_tokenizer_is_refused_by_sampling_and_repaired_by_resume(trained, corpus_glob,
                                                                       tmp_path):
  from train import tokenizer as tokenizer_lib
  workdir = _copy(trained, tmp_path)
  before = _sample(workdir)
  import glob
  texts = [open(f).read() for f in sorted(glob.glob(corpus_glob))]
  other = tokenizer_lib.train_tokenizer(texts, 400)   # Another vocabulary: another tokenizer.
  other.save(os.path.join(workdir, 'tokenizer.model'))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match='not the one its checkpoint was trained'):
    _sample(workdir)
  # The config rebuilds exactly the checkpoint's tokenizer: resuming puts it back and trains on.
  result = trainer.train(tiny_train_config(corpus_glob, steps=4), workdir, log=lambda *_: None)
  assert result.step == 4 and _sample(workdir)[0][:9] == before[0][:9]


def test_resume_past_the_end_says_so_and_changes_nothing(trained, corpus_glob, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = tree_digest(workdir)
  logs = []
  result = trainer.train(tiny_train_config(corpus_glob, steps=2), workdir, log=logs.append)
  assert result.step == 3 and any('nothing to train' in line for line in logs)
  assert tree_digest(workdir) == before


def test_more_steps_on_resume_keep_the_schedule_unless_asked(trained, corpus_glob, tmp_path):
  # Issue 10, failure 6: raising train.steps used to stretch the cosine (lr jumped up).
  kept, stretched = _copy(trained, tmp_path / 'a'), _copy(trained, tmp_path / 'b')
  logs = []
  trainer.train(tiny_train_config(corpus_glob, steps=5), kept, log=logs.append)
  assert any('keeps its original length of 3 steps' in line for line in logs)
  cfg = tiny_train_config(corpus_glob, steps=5, schedule_steps=5)
  trainer.train(cfg, stretched, log=lambda *_: None)
  lr = lambda w: {r['step']: r['lr'] for r in map(json.loads, open(os.path.join(w, 'metrics.jsonl')))
                  if 'lr' in r}
  # 3-step schedule: at its end (10% of peak) for steps 4 and 5; the 5-step one is higher there.
  assert lr(kept)[4] == pytest.approx(0.1 * 3e-3) == lr(kept)[5]
  assert lr(stretched)[4] > 2 * lr(kept)[4]


def test_second_writer_is_refused_naming_the_holder(trained, corpus_glob, tmp_path):
  workdir = _copy(trained, tmp_path)
  with WorkdirLock(workdir):
    before = tree_digest(workdir)
    with pytest.raises(WorkdirLockedError, match=rf'in use by pid {os.getpid()} on host'):
      trainer.train(tiny_train_config(corpus_glob, steps=6), workdir, log=lambda *_: None)
    assert tree_digest(workdir) == before
  assert not os.path.exists(os.path.join(workdir, 'lock'))   # Released: no lock file left.


def test_stale_lock_is_taken_over(tmp_path):
  (tmp_path / 'lock').write_text('{"host": "gone", "pid": 99999999, "since": "2026-01-01"}')
  logs = []
  with WorkdirLock(str(tmp_path), log=logs.append):
    assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()
  assert any('stale lock from pid 99999999 on host gone' in line for line in logs)
  # A lock held through another open file description (as another process would) refuses.
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirLockedError):
      WorkdirLock(str(tmp_path)).acquire()


def test_corrupt_newest_checkpoint_falls_back_or_refuses(corpus_glob, tmp_path):
  # Issue 10, failure 2: XOR 4 KB in the middle of the largest array file of the newest step.
  workdir = str(tmp_path / 'w')
  trainer.train(tiny_train_config(corpus_glob, steps=6), workdir, log=lambda *_: None)
  step_dir = os.path.join(workdir, 'checkpoints', '6')
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, 'rb').read())
  mid = len(data) // 2
  data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
  open(largest, 'wb').write(bytes(data))

  cfg = tiny_train_config(corpus_glob, steps=8, on_corrupt='stop')
  _refused(cfg, workdir, ckpt_lib.CheckpointCorruptError, r'step 6 .* corrupt')
  logs = []
  result = trainer.train(tiny_train_config(corpus_glob, steps=8), workdir, log=logs.append)
  assert any('falling back to step 3' in line for line in logs) and result.step == 8
  assert any('at step 3' in line for line in logs)


def test_invalid_value_is_refused_before_the_workdir_is_touched(trained, corpus_glob, tmp_path):
  workdir = _copy(trained, tmp_path)
  _refused(tiny_train_config(corpus_glob, steps=6, lr=-1.0), workdir, ConfigError, r'config\.train\.lr')

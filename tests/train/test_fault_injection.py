"""SIGKILL at 8 points of a training run (every failpoint kind, and random times), resuming
after each: nothing is lost or corrupted.

Kills come from `train/failpoints.py` (tokenizer training and its files, the token cache, after a
training step, right after an asynchronous checkpoint save has started) and from timers (anywhere,
compilation included). After every kill the newest checkpoint that verifies may be at most one
checkpoint interval behind the last step the run logged, and the run that finally completes has
exactly the parameters of a run that was never interrupted.
"""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import config_file

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY = 12, 2
KILLS = 8   # len(_schedule()): each kill relaunches (imports, compiles), so few and chosen.


def _launch(cfg, workdir, failpoint=''):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu',
             PALMAX_FAILPOINT=failpoint)
  return subprocess.Popen(
      [sys.executable, '-m', 'launch.main', f'--config={cfg}', f'--workdir={workdir}', '--nosample'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  for line in open(path):
    try:
      rows.append(json.loads(line))
    except ValueError:
      pass   # A line cut by the kill.
  return [r['step'] for r in rows if 'loss' in r]


def _params(workdir):
  from launch import workdir as workdir_lib
  return workdir_lib.load_model(workdir)[3]


def _schedule(rng) -> list[str]:
  """The kill points in order: each failpoint kind at least once (a random pick could miss
  one), and a timer (anywhere, compilation included) among them."""
  late = ['step:2', 'checkpoint.save:1', 'timer', 'step:3', 'checkpoint.save:2']
  return ['tokenizer.train:1', 'tokenizer.write:1', 'tokens.write:1'] + [
      f'timer:{rng.uniform(1.0, 8.0):.2f}' if p == 'timer' else p for p in late]


def _applies(point, workdir) -> bool:
  """A data-phase point applies only while its file is still to be written."""
  done = {'tokenizer': 'tokenizer.json', 'tokens': 'tokens.json'}.get(point.split('.')[0])
  return done is None or not os.path.exists(os.path.join(workdir, done))


def test_sigkill_anywhere_loses_at_most_one_interval_and_resumes_exactly(tmp_path):
  from train import checkpoint as ckpt_lib
  cfg = config_file(tmp_path, steps=STEPS, checkpoint_every=EVERY, eval_every=0, log_every=1,
                    async_checkpoints=True, keep_checkpoints=3)
  reference = str(tmp_path / 'reference')
  p = _launch(cfg, reference)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out[-3000:]

  workdir = str(tmp_path / 'killed')
  kills, history = 0, []
  for point in _schedule(random.Random(0)):
    if not _applies(point, workdir):
      continue
    if point.startswith('timer:'):
      p = _launch(cfg, workdir)
      try:
        p.wait(timeout=float(point.split(':')[1]))
      except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
    else:
      p = _launch(cfg, workdir, failpoint=point)
    out, _ = p.communicate(timeout=600)
    history.append((point, p.returncode))
    if p.returncode == 0:   # The run finished before reaching the point: start over elsewhere.
      assert 'nothing to train' in out or 'step' in out, out[-2000:]
      break
    assert p.returncode == -signal.SIGKILL, (point, out[-3000:])
    kills += 1
    logged = _logged_steps(workdir)
    if logged and os.path.isdir(os.path.join(workdir, 'checkpoints')):
      kept = ckpt_lib.Checkpointer(workdir).latest_verified_step() or 0
      assert max(logged) - kept <= EVERY, (point, max(logged), kept, history)
  assert kills == KILLS or history[-1][1] == 0, history
  assert {pt.split(':')[0] for pt, _ in history} >= {'tokenizer.train', 'tokenizer.write',
                                                      'tokens.write', 'step', 'checkpoint.save'}

  p = _launch(cfg, workdir)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out[-3000:]
  import jax
  for a, b in zip(jax.tree.leaves(_params(reference)), jax.tree.leaves(_params(workdir))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One metrics row per step, as the uninterrupted run wrote them.
  assert _logged_steps(workdir) == list(range(1, STEPS + 1)) == _logged_steps(reference)

"""The sweep runner (launch/sweep.py) on a 2-point micro sweep of tiny models."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from configs.sweeps.cpu import get_sweep_defaults
from launch import sweep
from model.config import ConfigError
from tests.conftest import tiny_train_config, write_code_corpus
from train import trainer

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL, LARGE = 'C3e08_d16_L1', 'C3e08_d32_L1'


def _micro_cfg(tmp_path):
  """One budget x two sizes of 6-16 steps of 8x32 tokens on the test corpus."""
  cfg = tiny_train_config(write_code_corpus(tmp_path / 'corpus'))
  cfg.train.update(eval_batches=2, tensorboard=False)
  cfg.sweep = get_sweep_defaults()
  cfg.sweep.update(budgets='3e8', ladder=((16, 1), (32, 1)), head_dim=8, sizes_per_budget=2,
                   min_steps=2, log_points=4, bootstrap=5)
  return cfg


def _config_file(cfg, tmp_path) -> str:
  path = tmp_path / 'sweep_cfg.py'
  path.write_text(
      'import json, ml_collections\n'
      f'def get_config():\n  d = json.loads({cfg.to_json()!r})\n'
      '  d["data"]["paths"] = tuple(d["data"]["paths"])\n  return ml_collections.ConfigDict(d)\n')
  return str(path)


def _run(args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return {r['name']: r for r in json.load(f)}


def test_skip_finished_record_failed_retry_then_one_job_per_point(tmp_path):
  cfg, workdir = _micro_cfg(tmp_path), str(tmp_path / 'sweep')
  calls = []

  def flaky_train(point_cfg, point_dir, log=print):
    calls.append(os.path.basename(point_dir))
    if calls[-1] == LARGE:
      raise RuntimeError('simulated crash')
    return trainer.train(point_cfg, point_dir, log=log)

  lines = []
  s = sweep.run_sweep(cfg, workdir, log=lines.append, train_fn=flaky_train)
  assert (s.done, s.failed, calls) == ([SMALL], [LARGE], [SMALL, LARGE])
  assert 'C (target)' in lines[0] and SMALL in lines[0]  # The plan table comes first.
  record = sweep.read_record(os.path.join(workdir, 'points', LARGE))
  assert record['status'] == 'failed' and 'RuntimeError: simulated crash' in record['error']
  rows = _results(workdir)
  assert rows[SMALL]['status'] == 'done' and rows[LARGE]['status'] == 'failed'
  report = open(os.path.join(workdir, 'report.md')).read()
  assert f'failed: {LARGE}' in report and 'not fitted' in report   # 2 points: nothing to fit.

  # Re-run: the finished point is skipped and the failed one is reported, not retried ...
  s = sweep.run_sweep(cfg, workdir, log=lines.append, train_fn=flaky_train)
  assert (s.done, s.failed, s.trained, len(calls)) == ([SMALL], [LARGE], [], 2)
  assert any('--retry_failed' in line for line in lines)
  # ... unless asked to (it fails again here).
  s = sweep.run_sweep(cfg, workdir, log=lines.append, train_fn=flaky_train, retry_failed=True)
  assert (s.trained, s.failed, calls[2:]) == ([LARGE], [LARGE], [LARGE])

  # --submit=print --retry_failed: one ordinary launch.main command per unfinished point.
  cfg_file = _config_file(cfg, tmp_path)
  r = _run(['launch.sweep', f'--config={cfg_file}', f'--workdir={workdir}', '--submit=print',
            '--retry_failed', '--config.train.lr=0.002'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'C (target)' in r.stdout   # The plan is printed before anything runs.
  commands = [line for line in r.stdout.splitlines() if line.startswith('python -m launch.main')]
  assert len(commands) == 1 and f'--config.sweep.point={LARGE}' in commands[0]
  assert '--config.model.d_model=32' in commands[0] and '--config.train.steps=' in commands[0]
  assert '--config.train.lr=0.002' in commands[0]   # Overrides given to the sweep are passed on.

  # That job, run as printed, trains the point as an ordinary run and records it.
  r = _run(shlex.split(commands[0])[2:])
  assert r.returncode == 0, r.stderr[-3000:]
  assert sweep.read_record(os.path.join(workdir, 'points', LARGE))['status'] == 'done'

  # launch.main on the sweep config runs the sweep: nothing left to train, it collects and fits.
  r = _run(['launch.main', f'--config={cfg_file}', f'--workdir={workdir}'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'[{SMALL}]' not in r.stdout and '2 done, 0 failed' in r.stdout
  with open(os.path.join(workdir, 'results.csv')) as f:
    header, *csv_rows = f.read().strip().split('\n')
  assert len(csv_rows) == 2 and header.startswith('name,status,budget')
  for row in _results(workdir).values():
    assert row['status'] == 'done' and row['eval_loss'] > 0 and row['tokens_per_s'] > 0
    assert row['tokens'] == row['steps'] * 8 * 32
    assert row['flops'] == row['flops_per_token'] * row['tokens'] and abs(row['flops'] / 3e8 - 1) < 0.5
  # The local points shared one tokenizer and tokenized corpus (hard links, not copies).
  small = os.path.join(workdir, 'points', SMALL)
  assert os.path.samefile(os.path.join(small, 'tokens_train.npy'),
                          os.path.join(workdir, 'data', 'tokens_train.npy'))
  assert json.load(open(os.path.join(small, 'tokenizer.json')))['key'].startswith('copied:')


def test_config_without_sweep_section(tmp_path):
  cfg = _micro_cfg(tmp_path)
  with cfg.unlocked():
    del cfg['sweep']
  with pytest.raises(ConfigError, match='config.sweep'):
    sweep.run_sweep(cfg, str(tmp_path / 'w'), log=lambda _: None)

"""`python -m launch.eval` run as a user would, on the tiny trained workdir."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import tree_digest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')


def _eval(*args):
  return subprocess.run([sys.executable, '-m', 'launch.eval', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)


def test_eval_writes_records_metrics_and_the_judge_report(trained_workdir, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(trained_workdir[0], workdir)
  r = _eval(f'--workdir={workdir}', '--tasks=arithmetic:3shot,stdlib_mc', '--limit=3',
            '--num_slots=2', '--autorater=reference')
  assert r.returncode == 0, r.stderr[-3000:]
  assert '| arithmetic | 3-shot | exact_match |' in r.stdout
  assert "Cohen's kappa" in r.stdout and 'position bias' in r.stdout
  path = os.path.join(workdir, 'eval', 'arithmetic_3shot+stdlib_mc-step3.json')
  assert f'results: {path}' in r.stdout
  res = json.load(open(path))
  assert res['step'] == 3 and set(res['tasks']) == {'arithmetic:3shot', 'stdlib_mc'}
  rec = res['tasks']['arithmetic:3shot']['records'][0]
  assert rec['prompt'].count('\nA: ') == 3 and 'response' in rec
  last = json.loads(open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()[-1])
  assert last['step'] == 3 and 'eval/stdlib_mc/acc' in last
  assert 0.0 <= last['eval/arithmetic:3shot/exact_match'] <= 1.0


@pytest.mark.parametrize('args,message', [
    (['--tasks=nope'], "unknown task 'nope'"),
    (['--tasks=arithmetic:5shots'], "unknown variant '5shots'"),
    (['--tasks=arithmetic', '--limit=0'], '--limit must be >= 1'),
    ([], 'nothing to do'),
    (['--lm_eval_tasks=not_a_task', '--lm_eval_include=/nonexistent'], 'unknown task'),
])
def test_bad_input_is_one_line_and_changes_nothing(trained_workdir, tmp_path, args, message):
  workdir = str(tmp_path / 'w')
  shutil.copytree(trained_workdir[0], workdir)
  before = tree_digest(workdir)
  r = _eval(f'--workdir={workdir}', *args)
  assert r.returncode == 2, r.stderr[-2000:]
  err = r.stderr.strip().splitlines()
  assert err[-1].startswith('error: ') and message in err[-1], r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  assert tree_digest(workdir) == before


def test_list_tasks_and_a_missing_workdir(tmp_path):
  r = _eval('--list_tasks')
  assert r.returncode == 0
  for name in ('arithmetic', 'stdlib_mc', 'stdlib_docstring', 'stdlib_code', 'stdlib_ppl'):
    assert name in r.stdout
  r = _eval(f'--workdir={tmp_path / "none"}', '--tasks=arithmetic')
  assert r.returncode == 2 and 'config.json not found' in r.stderr

"""The command-line entry points, run as a user would (subprocesses)."""
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import config_file as _config_file

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, **kw):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, **kw)


def test_train_then_sample_from_the_command_line(tmp_path):
  cfg = _config_file(tmp_path, steps=4, eval_every=4, checkpoint_every=4)
  workdir = str(tmp_path / 'w')
  r = _run(['launch.main', f'--config={cfg}', f'--workdir={workdir}',
            '--config.train.steps=5', '--config.sample.prompt=def f'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'step      5/5' in r.stdout and 'bits/byte' in r.stdout
  assert '--- 2 samples from step 5' in r.stdout
  r = _run(['launch.sample', f'--workdir={workdir}', '--prompt=import', '--temperature=0',
            '--num_samples=2', '--max_new_tokens=6'])
  assert r.returncode == 0, r.stderr[-3000:]
  samples = r.stdout.split('-' * 40)
  assert samples[0].strip().startswith('import') and samples[0].strip() == samples[1].strip()
  # A prompt longer than the context is refused with a message, not a traceback.
  r = _run(['launch.sample', f'--workdir={workdir}', '--prompt=' + 'x = 1\n' * 200])
  assert r.returncode == 2 and 'exceeds the context config.model.max_seq_len' in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
  # Issue 10, failure 4: meaningless sampling values were accepted or crashed deep in JAX.
  for flag in ('--temperature=-1', '--top_p=1.5', '--max_new_tokens=-3', '--num_samples=0'):
    r = _run(['launch.sample', f'--workdir={workdir}', flag])
    assert r.returncode == 2 and r.stderr.startswith(f'error: {flag.split("=")[0]} '), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr


def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
  cfg = _config_file(tmp_path, steps=100000, eval_every=0, checkpoint_every=0, log_every=1)
  workdir = str(tmp_path / 'w')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  # Sampling is on: a preempted run saves and exits, it does not sample.
  args = [sys.executable, '-m', 'launch.main', f'--config={cfg}', f'--workdir={workdir}']
  p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  out = []
  for line in p.stdout:  # Wait until training is under way, then preempt.
    out.append(line)
    if 'step ' in line and '/100000' in line:
      # Issue 10, failure 3: a second trainer on a live workdir used to run too, interleaving
      # metrics.jsonl; now it is refused, naming the holder, and the first carries on.
      second = _run(['launch.main', f'--config={cfg}', f'--workdir={workdir}'])
      assert second.returncode == 2 and f'is in use by pid {p.pid} on host' in second.stderr
      assert len(second.stderr.strip().splitlines()) == 1, second.stderr
      p.send_signal(signal.SIGTERM)
      break
  rest, _ = p.communicate(timeout=120)
  assert p.returncode == 0, ''.join(out) + rest
  assert 'Received signal 15: saved step' in rest
  assert 'samples from' not in rest
  assert rest.rstrip().endswith('Run the same command again to resume.')   # Nothing after it.
  saved = int(rest.split('saved step ')[1].split()[0])
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(saved)))
  r = _run(['launch.main', f'--config={cfg}', f'--workdir={workdir}', '--nosample',
            f'--config.train.steps={saved + 2}'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'at step {saved}' in r.stdout + r.stderr


@pytest.mark.parametrize('override,message', [
    ('--config.model.num_layer=3', 'num_layer'),
    ('--config.model.num_kv_heads=3', 'num_heads=4 must be divisible by config.model.num_kv_heads=3'),
    ('--config.data.paths=("/nonexistent/*.txt",)', '/nonexistent'),
])
def test_bad_input_gets_a_clear_error(tmp_path, override, message):
  cfg = _config_file(tmp_path)
  r = _run(['launch.main', f'--config={cfg}', f'--workdir={tmp_path / "w"}', override])
  assert r.returncode != 0
  assert message in r.stderr
  assert 'Traceback' not in r.stderr

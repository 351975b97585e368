"""Multi-host training: two local processes (4 simulated CPU devices each, jax.distributed over
loopback) follow the same loss trajectory as one process with 8 devices."""
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.launch.test_main import ROOT, _config_file

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _losses(text: str) -> list[str]:
  return re.findall(r'^step +\d+/\d+ +loss (\S+)', text, re.M) + re.findall(r'eval @ \d+: loss (\S+)', text)


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  cfg = _config_file(tmp_path, steps=4, eval_every=4, checkpoint_every=4, log_every=1)
  args = [sys.executable, '-m', 'launch.main', f'--config={cfg}', '--nosample']

  def env(devices):
    return dict(os.environ, JAX_PLATFORMS='cpu',
                XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')

  one = subprocess.run(args + [f'--workdir={tmp_path / "one"}'], cwd=ROOT, env=env(8),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]

  port = _free_port()
  procs = [subprocess.Popen(args + [f'--workdir={tmp_path / "two"}',
                                    f'--coordinator_address=127.0.0.1:{port}',
                                    '--num_processes=2', f'--process_id={i}'],
                            cwd=ROOT, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]

  want = _losses(one.stdout)
  assert len(want) == 4  # Steps 2-4 (step 1 only starts the clock) and the eval.
  assert _losses(outs[0][0]) == want   # Process 0 logs; the losses agree to the printed digits.
  assert _losses(outs[1][0]) == []     # Process 1 stays quiet.
  assert os.path.isdir(tmp_path / 'two' / 'checkpoints' / '4')

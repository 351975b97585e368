"""Multi-host training: two local processes (simulated CPU devices, jax.distributed over
loopback) follow the same loss trajectory as one process with all the devices, for pretraining
and for RL (every process runs the rollout engine in lockstep over the global mesh)."""
import json
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


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _one_and_two(args, tmp_path, devices: int = 8):
  """(stdout of one process with `devices` devices, [stdout of each of two processes with half])."""
  one = subprocess.run(args + [f'--workdir={tmp_path / "one"}'], cwd=ROOT, env=_env(devices),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(args + [f'--workdir={tmp_path / "two"}',
                                    f'--coordinator_address=127.0.0.1:{port}',
                                    '--num_processes=2', f'--process_id={i}'],
                            cwd=ROOT, env=_env(devices // 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return one.stdout, [out for out, _ in outs]


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  cfg = _config_file(tmp_path, steps=4, eval_every=4, checkpoint_every=4, log_every=1)
  one, two = _one_and_two([sys.executable, '-m', 'launch.main', f'--config={cfg}', '--nosample'],
                          tmp_path)
  want = _losses(one)
  assert len(want) == 4  # Steps 2-4 (step 1 only starts the clock) and the eval.
  assert _losses(two[0]) == want   # Process 0 logs; the losses agree to the printed digits.
  assert _losses(two[1]) == []     # Process 1 stays quiet.
  assert os.path.isdir(tmp_path / 'two' / 'checkpoints' / '4')


def test_grpo_on_two_processes_matches_one_process(trained_workdir, tmp_path):
  """Same prompts, seeds and parameters everywhere: the engine's sampled tokens, the rewards and
  the losses agree with a one-process run (the engine fetches sharded outputs with an
  all-gather: model/sharding.to_host). One device per process keeps it quick: the rows are still
  split across the processes."""
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps({'prompt': f'def func_{i}(x, y={i % 4}):\n'}) + '\n'
                             for i in range(24)))
  overrides = [f'data.paths=("{prompts}",)', 'data.sft_task=', 'data.seq_len=24',
               'align.reward=rule:tests.train.rl.reward_rules:spaces', 'align.group_size=4',
               'align.max_completion_len=6', 'train.steps=4', 'train.batch_size=8', 'train.lr=3e-3',
               'train.warmup_steps=1', 'train.log_every=1', 'train.eval_every=0',
               'train.checkpoint_every=4', 'train.eval_tasks=', 'train.peak_flops=1e11',
               'train.tensorboard=False', 'serve.num_slots=8', 'serve.page_size=8',
               'serve.prefill_chunk=16', 'mesh.data=2']
  one, two = _one_and_two([sys.executable, '-m', 'launch.main', '--nosample',
                           f'--config=configs/grpo.py:{trained_workdir[0]}']
                          + [f'--config.{o}' for o in overrides], tmp_path, devices=2)

  def rl(text):   # (loss, kl, reward) of each logged step
    return re.findall(r'^step +\d+/\d+ +loss (\S+) +kl (\S+) +reward (\S+)', text, re.M)
  want = rl(one)
  assert len(want) == 3 and len({r for _, _, r in want}) > 1, one[-2000:]
  assert rl(two[0]) == want and rl(two[1]) == []
  assert os.path.isdir(tmp_path / 'two' / 'checkpoints' / '4')


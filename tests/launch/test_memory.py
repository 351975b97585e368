"""The compile-only memory command: FSDP over 8 devices cuts per-device parameter + optimizer
bytes ~8x against data parallelism, nothing is allocated, and bad layouts fail before compiling."""
import os
import subprocess
import sys

import pytest

from launch import memory
from model.pipeline import PipelineError
from model.sharding import ShardingError
from tests.launch.test_main import ROOT


def _cfg(**mesh):
  from configs.base import get_base
  cfg = get_base()
  cfg.model.update(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=128, max_seq_len=64)
  cfg.data.seq_len = 32
  cfg.train.update(batch_size=8, steps=10)
  cfg.mesh.update(mesh)
  return cfg


_ANALYSES = {}


def _analyze(preset):
  if preset not in _ANALYSES:
    _ANALYSES[preset] = memory.analyze(_cfg(preset=preset))
  return _ANALYSES[preset]


def test_fsdp_cuts_param_and_optimizer_bytes_per_device_about_8x():
  dp, fsdp = _analyze('data'), _analyze('fsdp')
  assert dp['devices'] == fsdp['devices'] == 8
  assert dp['params'] == 4 * dp['param_count']      # Replicated float32.
  assert 8 * dp['param_count'] <= dp['opt_state'] <= 8 * dp['param_count'] + 64  # Adam mu, nu, counts.
  ratio = (dp['params'] + dp['opt_state']) / (fsdp['params'] + fsdp['opt_state'])
  assert 6.5 < ratio <= 8.0
  # The compiled executable agrees: its arguments are the state shards (+ the batch).
  for r in (dp, fsdp):
    assert r['params'] + r['opt_state'] <= r['argument'] < r['params'] + r['opt_state'] + 4096
    assert r['temp'] > 0 and r['flops'] > 0
  assert fsdp['argument'] < dp['argument'] / 6


def test_bad_layouts_fail_before_compiling():
  with pytest.raises(ShardingError, match='multiply to 12, but there are 8 devices'):
    memory.analyze(_cfg(data=3, tensor=4))
  cfg = _cfg(pipeline=2)
  cfg.model.num_layers = 3
  with pytest.raises(PipelineError, match='num_layers=3 .* not divisible by config.pipeline.stages=2'):
    memory.analyze(cfg)
  cfg = _cfg(pipeline=2)
  cfg.pipeline.microbatches = 3
  with pytest.raises(PipelineError, match='not divisible by config.pipeline.microbatches=3'):
    memory.analyze(cfg)


def test_report_names_every_figure():
  text = memory.report(_analyze('fsdp'))
  for what in ('mesh fsdp=8', 'params', 'optimizer state', 'temp', 'peak estimate', 'step FLOPs',
               'model FLOPs', 'XLA:CPU'):
    assert what in text, what


@pytest.mark.parametrize('impl, lo, hi', [('flash', 3.0, 5.0), ('xla', 8.0, 20.0)])
def test_temp_bytes_grow_linearly_in_seq_len_with_flash_quadratically_with_xla(impl, lo, hi):
  # One layer, one row on one device, compile only: temp bytes at 4T over temp bytes at T.
  import jax
  cfg = _cfg(preset='data')
  cfg.model.update(num_layers=1, attention_impl=impl)
  cfg.train.batch_size = 1
  short, long = memory.analyze_seq_lens(cfg, [256, 1024], jax.devices()[:1])
  assert (short['seq_len'], long['seq_len']) == (256, 1024)
  assert lo < long['temp'] / short['temp'] < hi
  text = memory.seq_len_report([short, long])
  assert f'attention_impl={impl!r}' in text and '    1024 ' in text


@pytest.mark.slow
def test_pipelined_step_compiles_and_reports_its_bubble():
  r = memory.analyze(_cfg(preset='fsdp', pipeline=2))
  # fsdp=4 alone would hold a quarter of every parameter; the layers are also split over 2 stages.
  assert _analyze('fsdp')['params'] < r['params'] < r['param_count'] * 4 / 4
  text = memory.report(r)
  assert 'mesh pipeline=2 x fsdp=4' in text and 'pipeline bubble fraction 0.333' in text


@pytest.mark.slow
def test_cli_compiles_for_more_devices_than_the_test_process_has(tmp_path):
  cfg_file = tmp_path / 'cfg.py'
  cfg_file.write_text(
      'from configs.base import get_base\n\n\ndef get_config():\n  cfg = get_base()\n'
      '  cfg.model.update(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,\n'
      '                   head_dim=16, mlp_dim=128, max_seq_len=64)\n'
      '  cfg.data.seq_len = 32\n  cfg.train.update(batch_size=16, steps=10)\n'
      "  cfg.mesh.preset = 'fsdp'\n  return cfg\n")
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # Its XLA_FLAGS says 8 devices: --devices wins.
  out = subprocess.run([sys.executable, '-m', 'launch.memory', f'--config={cfg_file}',
                        '--devices=16', '--config.mesh.tensor=1'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'target: 16 x cpu' in out.stdout and 'mesh fsdp=16' in out.stdout
  bad = subprocess.run([sys.executable, '-m', 'launch.memory', f'--config={cfg_file}',
                        '--devices=16', '--config.mesh.preset=fsdp_tensor',
                        '--config.mesh.tensor=3'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and 'error: config.mesh' in bad.stderr, bad.stderr[-2000:]


def _has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401
    return True
  except ImportError:
    return False


@pytest.mark.skipif(not _has_libtpu(), reason='compile-only TPU devices need libtpu')
def test_tpu_topology_compiles_without_a_tpu():
  devices = memory.tpu_devices('v5p:2x2x2')
  r = memory.analyze(_cfg(preset='fsdp'), devices)
  assert r['platform'] == 'tpu' and r['devices'] == 8
  assert r['temp'] > 0 and r['params'] == memory.analyze(_cfg(preset='fsdp'))['params']


def test_frozen_parameters_have_no_optimizer_state():
  # train.trainable selects the attention query weights: Adam's moments exist for them alone.
  cfg = _cfg(preset='data')
  cfg.train.trainable = r'attn/w_q$'
  frozen, full = memory.analyze(cfg), _analyze('data')
  w_q = cfg.model.num_layers * cfg.model.d_model * cfg.model.num_heads * cfg.model.head_dim
  assert frozen['params'] == full['params']
  assert 8 * w_q <= frozen['opt_state'] <= 8 * w_q + 64 < full['opt_state']

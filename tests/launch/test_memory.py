"""The compile-only memory command: FSDP over 8 devices cuts per-device parameter + optimizer
bytes ~8x against data parallelism, nothing is allocated, and bad layouts fail before compiling."""
import importlib
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
               'model FLOPs', 'XLA:CPU', 'trainable', 'frozen'):
    assert what in text, what
  n = _analyze('fsdp')['total_params']   # No PEFT: everything trains.
  assert f'trains {n:,} of {n:,} parameters (100.00%)' in text


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
    importlib.import_module('libtpu')
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


# --- PEFT: config.peft in `analyze`, and the --peft_table comparison ---------------------------

def _quant_available() -> bool:
  """model/quant.py (QLoRA's frozen-base quantization) importable: its rows are checked."""
  try:
    importlib.import_module('model.quant')
    return True
  except Exception:   # Missing or half-written: the quantized rows are skipped, not failed.
    return False


_TABLE = {}


def _table() -> dict:
  """peft_table on _cfg over one device (replicated: per-device bytes = all bytes), by row."""
  if not _TABLE:
    import jax
    _TABLE.update({r['name']: r for r in memory.peft_table(_cfg(preset='data'), jax.devices()[:1])})
  return _TABLE


def _lora_closed_form(m, rank: int) -> int:
  """LoRA on the default targets attn/w_(q|v): per layer rank x (fan_in + fan_out) for each."""
  w_q = (m.d_model, m.num_heads * m.head_dim)
  w_v = (m.d_model, m.num_kv_heads * m.head_dim)
  return m.num_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in (w_q, w_v))


def _quant_weights(m) -> list[tuple[int, int]]:
  """(contracted size K, output size O) of each weight the default quant_targets
  '(attn|mlp)/w_\\w+' quantize, one layer (swiglu: gate, up, down)."""
  assert m.activation == 'swiglu'
  q, kv, f, d = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.mlp_dim, m.d_model
  return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def test_peft_table_full_row_trains_everything_with_adam_moments_for_all():
  full = _table()['full']
  n = full['total_params']
  assert full['trainable_params'] == n and full['params_frozen'] == 0
  assert full['params'] == full['params_trainable'] == 4 * n   # float32
  assert 8 * n <= full['opt_state'] <= 8 * n + 64                # Adam mu, nu (+ counts)
  assert full['ratio'] == 1.0 and full['optimizer'] == 'adamw'


def test_peft_table_lora_counts_and_bytes_match_the_closed_form():
  from model.config import ModelConfig
  cfg = _cfg()
  m = ModelConfig.from_dict(cfg.model.to_dict())
  assert (cfg.peft.lora_rank, cfg.peft.lora_targets) == (8, r'attn/w_(q|v)')
  full, lora = _table()['full'], _table()['lora']
  delta = _lora_closed_form(m, 8)
  assert delta == 2 * 8 * ((64 + 64) + (64 + 32)) == 3584
  assert lora['trainable_params'] == delta
  assert lora['total_params'] == full['total_params'] + delta
  assert lora['params_trainable'] == 4 * delta and lora['params_frozen'] == full['params']
  assert lora['params'] == full['params'] + 4 * delta
  # Adam's mu and nu (float32) for the factors alone, as the full row counts them (+ counts).
  assert 8 * delta <= lora['opt_state'] <= 8 * delta + 64
  # A float32 frozen base keeps 4 of full AdamW's 12 bytes/param: under 3x, approaching it.
  assert lora['param_opt'] == lora['params'] + lora['opt_state']
  assert 2.5 < full['param_opt'] / lora['param_opt'] == lora['ratio'] < 3.0
  # Adapters (Houlsby: after attn/w_o and mlp/w_down, each D->m->D) and the soft prompt.
  p = cfg.peft
  assert _table()['adapter']['trainable_params'] == m.num_layers * 2 * (2 * m.d_model * p.adapter_dim)
  assert _table()['prompt']['trainable_params'] == p.prompt_tokens * m.d_model
  for name in ('adapter', 'prompt'):
    r = _table()[name]
    assert 8 * r['trainable_params'] <= r['opt_state'] <= 8 * r['trainable_params'] + 64
    assert r['params_frozen'] == full['params']


def test_peft_table_quantized_bases_shrink_parameter_bytes():
  if not _quant_available():
    pytest.skip('model/quant.py is not importable yet')
  from model.config import ModelConfig
  cfg = _cfg()
  m = ModelConfig.from_dict(cfg.model.to_dict())
  t = _table()
  full, lora = t['full'], t['lora']
  rows = {k: t[k] for k in ('lora+int8', 'lora+int4', 'lora+nf4 (QLoRA)')}
  for name, r in rows.items():
    assert 'error' not in r, (name, r.get('error'))
    # Same model, same adapters: the logical counts and the optimizer state do not change.
    assert (r['trainable_params'], r['total_params'], r['opt_state']) == (
        lora['trainable_params'], lora['total_params'], lora['opt_state']), name
  int8, int4, nf4 = rows.values()
  assert nf4['params'] == int4['params'] < int8['params'] < full['params'] < lora['params']
  # Exactly: each quantized weight (K x O, per layer) goes from 4KO bytes to int8's KO codes + O
  # float32 scales, or 4-bit's KO/2 packed codes + KO/64 float32 scales (groups of 64).
  g = cfg.peft.quant_group_size
  ws = _quant_weights(m)
  float_b = m.num_layers * sum(4 * k * o for k, o in ws)
  assert int8['params'] == lora['params'] - float_b + m.num_layers * sum(k * o + 4 * o for k, o in ws)
  assert nf4['params'] == lora['params'] - float_b + m.num_layers * sum(
      k * o // 2 + 4 * (k // g) * o for k, o in ws)
  for r in rows.values():
    assert r['ratio'] >= 3.0   # Param + optimizer bytes at least 3x below full fine-tuning.


def test_peft_report_is_a_per_device_table_of_every_row():
  text = memory.peft_report(list(_table().values()), _cfg())
  assert 'per device' in text and 'full/this' in text and 'lora rank 8 on attn/w_(q|v)' in text
  for name, _, _ in memory.PEFT_ROWS:
    assert f'\n{name} ' in text, name
  assert '   3,584 (  3.2%)' in text   # LoRA's trainable count and share of all parameters.


def test_peft_table_names_rows_the_config_cannot_build_and_uses_adamw():
  import jax
  cfg = _cfg(preset='data')
  cfg.train.optimizer = 'muon'
  cfg.peft.quant_group_size = 48   # Divides no contracted size (64, 128): 4-bit rows fail.
  rows = {r['name']: r for r in memory.peft_table(cfg, jax.devices()[:1])}
  assert rows['full']['optimizer'] == 'muon' and rows['lora']['optimizer'] == 'adamw'
  if _quant_available():
    assert 'error' not in rows['lora+int8']   # int8: one scale per output channel, no groups.
    for name in ('lora+int4', 'lora+nf4 (QLoRA)'):
      assert 'group_size=48' in rows[name]['error'], rows[name]
  text = memory.peft_report(list(rows.values()))
  assert 'not built' in text and 'PEFT rows train with AdamW' in text


def test_analyze_applies_config_peft_and_its_checks_before_compiling():
  from model.config_rules import ConfigError
  import jax
  cfg = _cfg(preset='data')
  cfg.peft.update(method='lora', quant='nf4')
  cfg.train.optimizer = 'muon'   # The trainer's own check (train/config_schema.py).
  with pytest.raises(ConfigError, match='trains with AdamW'):
    memory.analyze(cfg, jax.devices()[:1])
  cfg.peft.method = ''
  with pytest.raises(ConfigError, match='quant=.nf4. freezes the base: it needs a'):
    memory.analyze(cfg, jax.devices()[:1])


@pytest.mark.slow
def test_analyze_compiles_a_lora_step_and_splits_frozen_from_trainable():
  import jax
  cfg = _cfg(preset='data')
  cfg.peft.method = 'lora'
  cfg.train.batch_size, cfg.data.seq_len = 1, 16   # Same parameters, a cheaper compile.
  r = memory.analyze(cfg, jax.devices()[:1])
  full = _table()['full']
  assert r['trainable_params'] == 3584 and r['total_params'] == full['total_params'] + 3584
  assert r['params_trainable'] == 4 * 3584 and r['params_frozen'] == full['params']
  assert 8 * 3584 <= r['opt_state'] <= 8 * 3584 + 64
  # The compiled step's arguments are the state (frozen base, factors, their moments) + batch.
  assert r['params'] + r['opt_state'] <= r['argument'] < r['params'] + r['opt_state'] + 4096
  text = memory.report(r)
  assert 'trains 3,584 of' in text and '(config.peft: lora)' in text and 'frozen' in text

"""The benchmark's figures: throughput and MFU from known FLOP counts and times, and a real
compiled step whose figures follow from its clock readings."""
import math
import time

import pytest

from launch import bench
from model.config import ModelConfig
from tests.conftest import tiny_train_config
from train import peak


def _small() -> ModelConfig:  # 1,295,232 training FLOPs per token at T=128 (test_scaling_counting).
  return ModelConfig.from_dict(dict(vocab_size=1000, d_model=64, num_layers=2, num_heads=4,
                                    num_kv_heads=1, head_dim=16, mlp_dim=256, activation='swiglu',
                                    block='serial', tie_embeddings=True))


def test_throughput_and_mfu_from_known_flops_and_time():
  r = bench.throughput(_small(), batch_size=4, seq_len=128, step_s=0.5)
  assert r['step_s'] == 0.5
  assert r['tokens_per_s'] == 1024.0                         # 4 x 128 tokens in 0.5 s.
  assert r['flops_per_s'] == 1_295_232 * 512 / 0.5           # = 1,326,317,568 FLOP/s.
  assert bench.mfu(r['flops_per_s'], 1e10) == pytest.approx(0.1326317568)
  assert bench.mfu(2e12, 1e13) == pytest.approx(0.2)


def test_bench_step_figures_come_from_its_clock_readings():
  cfg = tiny_train_config('unused', batch_size=8)
  cfg.mesh.data = -1
  readings = []

  def clock():
    readings.append(time.perf_counter())
    return readings[-1]

  r = bench.bench_step(cfg, 'float32', steps=2, clock=clock)
  assert len(readings) == 4   # compile start/end, timed loop start/end
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  loop_s = readings[3] - readings[2]
  assert r['compile_s'] == readings[1] - readings[0]
  # 2 timed steps of 8 rows x seq_len tokens in loop_s seconds.
  assert r['step_s'] == pytest.approx(loop_s / 2)
  assert r['tokens_per_s'] == pytest.approx(2 * 8 * cfg.data.seq_len / loop_s)
  assert r['flops_per_s'] == pytest.approx(
      2 * 8 * cfg.data.seq_len * model_cfg.flops_per_token(cfg.data.seq_len) / loop_s)
  for key in ('step_s', 'tokens_per_s', 'flops_per_s', 'compile_s'):
    assert math.isfinite(r[key]) and r[key] > 0, key
  assert r['params'] == model_cfg.param_count() and r['dtype'] == 'float32'


def test_matmul_peak_is_positive_and_plausible():
  p = peak.matmul_peak_flops('float32', n=256, seconds=0.1)
  assert 1e8 < p < 1e15

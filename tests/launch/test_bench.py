"""The benchmark runs a real compiled step and reports consistent figures."""
import pytest

from model.config import ModelConfig
from tests.conftest import tiny_train_config
from train import peak


def test_bench_step_reports_consistent_throughput():
  from launch.bench import bench_step
  cfg = tiny_train_config('unused', batch_size=8)
  cfg.mesh.data = -1
  r = bench_step(cfg, 'float32', steps=2)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  assert r['tokens_per_s'] == pytest.approx(tokens / r['step_s'])
  flops = ModelConfig.from_dict(cfg.model.to_dict()).flops_per_token(cfg.data.seq_len) * tokens
  assert r['flops_per_s'] == pytest.approx(flops / r['step_s'])


def test_matmul_peak_is_positive_and_plausible():
  p = peak.matmul_peak_flops('float32', n=256, seconds=0.1)
  assert 1e8 < p < 1e15

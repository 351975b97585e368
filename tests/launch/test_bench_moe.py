"""The MoE benchmark times the dense baseline and both dispatch modes at equal active FLOPs."""
import jax
import pytest
from flax import nnx

from launch import bench_moe
from model.layers import MLP


def test_bench_moe_rows_and_table():
  tokens, d, e, k, f = 64, 16, 4, 2, 8
  rows = bench_moe.bench(tokens=tokens, d_model=d, num_experts=e, top_k=k, expert_mlp_dim=f,
                         capacity_factors=(1.0, 1.25), steps=2, seq_len=16)
  assert [r['name'] for r in rows] == ['dense', 'moe capacity cf=1', 'moe capacity cf=1.25',
                                       'moe dropless']
  assert [r['dispatch'] for r in rows] == [None, 'capacity', 'capacity', 'dropless']
  # Same active FLOPs everywhere: 6 x tokens x (the dense MLP's parameters), which are also the
  # MoE's active parameters without the router (k experts of width F).
  cfg, moe_cfg = bench_moe._configs(d, e, k, f, 'swiglu', 'float32', 16)
  dense_params = sum(v.size for v in jax.tree.leaves(
      nnx.state(MLP(cfg, nnx.Rngs(0)), nnx.Param)))
  active = moe_cfg.layer_param_counts(d, gated=True)[1] - d * e
  assert dense_params == active == d * k * f * 3
  for r in rows:
    assert r['active_flops'] == 6 * tokens * active
    assert r['step_s'] > 0
    assert r['tokens_per_s'] == pytest.approx(tokens / r['step_s'])
    assert r['flops_per_s'] == pytest.approx(r['active_flops'] / r['step_s'])
    assert r['vs_dense'] == pytest.approx(r['step_s'] / rows[0]['step_s'])
  assert rows[0]['dropped'] is None and rows[-1]['dropped'] == 0.0
  assert all(0.0 <= r['dropped'] < 1.0 for r in rows[1:3])
  assert rows[1]['dropped'] >= rows[2]['dropped']  # More capacity never drops more.

  table = bench_moe.format_table(rows, peak_flops=1e11).splitlines()
  assert len(table) == 1 + len(rows)
  assert table[0].split() == ['layer', 'ms/step', 'tokens/s', 'active', 'GFLOP', 'GFLOP/s', 'MFU',
                              'vs', 'dense', 'dropped']
  for line, r in zip(table[1:], rows):
    assert line.startswith(r['name'])
    assert line.split()[-2] == f'{r["vs_dense"]:.2f}x'
  assert table[1].split()[-1] == '-' and table[-1].split()[-1] == '0.0%'


def test_bench_moe_rejects_ragged_rows():
  with pytest.raises(ValueError, match='--tokens=100 must be a multiple of --seq_len=16'):
    bench_moe.bench(tokens=100, seq_len=16)

"""The MoE benchmark times the dense baseline and both dispatch modes at equal active FLOPs."""
import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from launch import bench_moe
from model.layers import MLP
from model.moe import MoE


def test_bench_moe_rows_and_table():
  tokens, d, e, k, f = 64, 16, 4, 2, 8
  # cf = E/k gives every expert a slot per token (C = S): that row can drop nothing.
  rows = bench_moe.bench(tokens=tokens, d_model=d, num_experts=e, top_k=k, expert_mlp_dim=f,
                         capacity_factors=(1.0, e / k), steps=2, seq_len=16)
  assert [r['name'] for r in rows] == ['dense', 'moe capacity cf=1', 'moe capacity cf=2',
                                       'moe dropless']
  assert [r['dispatch'] for r in rows] == [None, 'capacity', 'capacity', 'dropless']
  assert [r['capacity_factor'] for r in rows] == [None, 1.0, 2.0, None]
  # Same active FLOPs everywhere: 6 x tokens x (the dense MLP's parameters), which are also the
  # MoE's active parameters without the router (k experts of width F).
  cfg, moe_cfg = bench_moe._configs(d, e, k, f, 'swiglu', 'float32', 16)
  dense_params = sum(v.size for v in jax.tree.leaves(
      nnx.state(MLP(cfg, nnx.Rngs(0)), nnx.Param)))
  active = moe_cfg.layer_param_counts(d, gated=True)[1] - d * e
  assert dense_params == active == d * k * f * 3
  assert bench_moe.active_flops(tokens, d, k * f, gated=True) == 6 * tokens * active
  for r in rows:
    assert r['active_flops'] == 6 * tokens * active
    for key in ('step_s', 'tokens_per_s', 'flops_per_s', 'vs_dense'):
      assert math.isfinite(r[key]) and r[key] > 0, (r['name'], key)
  assert rows[0]['dropped'] is None
  assert rows[2]['dropped'] == 0.0 and rows[3]['dropped'] == 0.0
  assert 0.0 <= rows[1]['dropped'] < 1.0

  peak = 1e11
  table = bench_moe.format_table(rows, peak_flops=peak).splitlines()
  assert len(table) == 1 + len(rows)
  assert table[0].split() == ['layer', 'ms/step', 'tokens/s', 'active', 'GFLOP', 'GFLOP/s', 'MFU',
                              'vs', 'dense', 'dropped']
  for line, r in zip(table[1:], rows):
    assert line.startswith(r['name'])
    cols = line[len(r['name']):].split()
    assert cols[2] == f'{6 * tokens * active / 1e9:.3f}'             # active GFLOP
    assert cols[4] == f'{100 * r["flops_per_s"] / peak:.1f}%'        # MFU against the given peak
  assert table[1].split()[-1] == '-' and table[-1].split()[-1] == '0.0%'


def test_capacity_and_dropless_agree_when_nothing_drops():
  """The two dispatch kernels the benchmark compares compute the same layer: with capacity for
  every token (cf = E/k), capacity and dropless outputs are equal."""
  e, k = 4, 2
  cfg, moe_cfg = bench_moe._configs(16, e, k, 8, 'swiglu', 'float32', 16)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16))
  out = {}
  for dispatch in ('capacity', 'dropless'):
    mc = dataclasses.replace(moe_cfg, dispatch=dispatch, capacity_factor=e / k)
    y, aux = MoE(cfg, mc, nnx.Rngs(0))(x)
    assert float(aux['dropped_fraction']) == 0.0
    out[dispatch] = np.asarray(y)
  np.testing.assert_allclose(out['capacity'], out['dropless'], rtol=1e-5, atol=1e-5)
  assert np.abs(out['dropless']).max() > 0


def test_bench_moe_rejects_ragged_rows():
  with pytest.raises(ValueError, match='--tokens=100 must be a multiple of --seq_len=16'):
    bench_moe.bench(tokens=100, seq_len=16)

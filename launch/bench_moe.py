"""MoE layer benchmark: forward+backward step time of the MoE FFN (capacity and dropless dispatch)
against a dense FFN with the same active FLOPs (mlp_dim = top_k * expert_mlp_dim).

  python -m launch.bench_moe [--tokens=4096 --d_model=256 --num_experts=8 --top_k=2
                              --expert_mlp_dim=512 --capacity_factors=1.0,1.25 --steps=10]

Each row is one jitted value-and-grad step (gradients wrt the input and every parameter, the MoE
aux losses in the loss), warmed up, timed as the median of --steps runs. Active FLOPs count the
FFN matmuls a token actually uses, x3 for forward + backward; they are identical for every row by
construction, so 'vs dense' is the overhead of routing, dispatch and combine. The MoE rows do
extra work that is not counted: the float32 router (2*N*D*E per forward), the index
scatter/gather of dispatch and combine (plus a sort for dropless), and padding: capacity mode
computes all E*C buffer rows (capacity_factor x the useful rows, empty slots included); dropless on
CPU pads each expert's rows to whole blocks (`model.moe_kernels.GMM_BLOCK`), on TPU/GPU it is one
`jax.lax.ragged_dot`.
"""
from __future__ import annotations

import statistics
import time

from absl import flags


def _define_flags() -> None:
  """CLI flags, defined only when this module is the program, so tests and other modules
  can import its functions without absl duplicate-flag clashes."""
  global _TOKENS, _SEQ, _D, _E, _K, _F, _ACT, _DTYPE, _CF, _STEPS, _PEAK
  _TOKENS = flags.DEFINE_integer('tokens', 4096, 'Tokens per step (batch * seq_len).')
  _SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per row; capacity groups span the whole batch.')
  _D = flags.DEFINE_integer('d_model', 256, 'Model width D.')
  _E = flags.DEFINE_integer('num_experts', 8, 'Routed experts E.')
  _K = flags.DEFINE_integer('top_k', 2, 'Experts per token k.')
  _F = flags.DEFINE_integer('expert_mlp_dim', 512, 'Expert hidden width F (dense: k*F).')
  _ACT = flags.DEFINE_string('activation', 'swiglu', 'swiglu | geglu | gelu.')
  _DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype (parameters stay float32).')
  _CF = flags.DEFINE_list('capacity_factors', ['1.0', '1.25'], 'Capacity factors to time.')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per row (median reported).')
  _PEAK = flags.DEFINE_float('peak_gflops', 0.0, 'Matmul peak for the MFU column; 0 = measure.')


def _configs(d_model, num_experts, top_k, expert_mlp_dim, activation, dtype, seq_len):
  from model.config import ModelConfig, MoEConfig
  dense = ModelConfig(vocab_size=8, d_model=d_model, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=d_model, mlp_dim=top_k * expert_mlp_dim, max_seq_len=seq_len,
                      activation=activation, dtype=dtype)
  dense.validate()
  moe = MoEConfig(num_experts=num_experts, top_k=top_k, expert_mlp_dim=expert_mlp_dim)
  moe.validate()
  return dense, moe


def active_flops(tokens: int, d_model: int, mlp_dim: int, gated: bool) -> float:
  """Forward + backward FLOPs of the FFN matmuls one token set uses: 3 x 2*N*D*F per matrix."""
  return 3.0 * 2.0 * tokens * d_model * mlp_dim * (3 if gated else 2)


def _time(f, args, steps: int) -> float:
  """Median seconds of `f(*args)` after two warm-up calls (the first compiles)."""
  import jax
  for _ in range(2):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench(tokens=4096, d_model=256, num_experts=8, top_k=2, expert_mlp_dim=512,
          activation='swiglu', dtype='float32', capacity_factors=(1.0, 1.25), steps=10,
          seq_len=256) -> list[dict]:
  """One row per layer: name, dispatch, capacity_factor, step_s, tokens_per_s, active_flops,
  flops_per_s, vs_dense (step time / dense step time), dropped (None for dense / dropless 0)."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from model.layers import MLP
  from model.moe import MoE

  if tokens % seq_len:
    raise ValueError(f'--tokens={tokens} must be a multiple of --seq_len={seq_len}')
  cfg, moe_cfg = _configs(d_model, num_experts, top_k, expert_mlp_dim, activation, dtype, seq_len)
  x = jax.random.normal(jax.random.key(0), (tokens // seq_len, seq_len, d_model), jnp.dtype(dtype))
  ct = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
  flops = active_flops(tokens, d_model, cfg.mlp_dim, cfg.gated)

  def step_fn(layer):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
      out = nnx.merge(graphdef, params, rest)(x)
      y, aux = out if isinstance(out, tuple) else (out, None)
      total = jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))
      if aux is not None:
        total = total + aux['aux_loss'] + aux['router_z_loss']
      return total, aux

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return f, (params, x)

  layers = [('dense', None, None, lambda: MLP(cfg, nnx.Rngs(0)))]
  for cf in capacity_factors:
    mc = dataclasses.replace(moe_cfg, dispatch='capacity', capacity_factor=float(cf))
    layers.append((f'moe capacity cf={float(cf):g}', 'capacity', float(cf),
                   lambda mc=mc: MoE(cfg, mc, nnx.Rngs(0))))
  mc = dataclasses.replace(moe_cfg, dispatch='dropless')
  layers.append(('moe dropless', 'dropless', None, lambda: MoE(cfg, mc, nnx.Rngs(0))))

  rows = []
  for name, dispatch, cf, make in layers:
    f, args = step_fn(make())
    step_s = _time(f, args, steps)
    (_, aux), _ = f(*args)
    rows.append(dict(name=name, dispatch=dispatch, capacity_factor=cf, step_s=step_s,
                     tokens_per_s=tokens / step_s, active_flops=flops, flops_per_s=flops / step_s,
                     dropped=None if aux is None else float(aux['dropped_fraction'])))
  for r in rows:
    r['vs_dense'] = r['step_s'] / rows[0]['step_s']
  return rows


def format_table(rows: list[dict], peak_flops: float) -> str:
  head = (f'{"layer":<22} {"ms/step":>9} {"tokens/s":>10} {"active GFLOP":>12} {"GFLOP/s":>9} '
          f'{"MFU":>6} {"vs dense":>8} {"dropped":>8}')
  lines = [head]
  for r in rows:
    dropped = '-' if r['dropped'] is None else f'{100 * r["dropped"]:.1f}%'
    lines.append(f'{r["name"]:<22} {1e3 * r["step_s"]:9.2f} {r["tokens_per_s"]:10,.0f} '
                 f'{r["active_flops"] / 1e9:12.3f} {r["flops_per_s"] / 1e9:9.1f} '
                 f'{100 * r["flops_per_s"] / peak_flops:5.1f}% {r["vs_dense"]:7.2f}x {dropped:>8}')
  return '\n'.join(lines)


def main(argv):
  del argv
  import jax
  from train import peak

  peak_flops = _PEAK.value * 1e9 or peak.matmul_peak_flops(_DTYPE.value)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}  jax {jax.__version__}')
  print(f'tokens {_TOKENS.value} (rows of {_SEQ.value}), d_model {_D.value}, E {_E.value}, '
        f'top_k {_K.value}, expert_mlp_dim {_F.value} (dense mlp_dim {_K.value * _F.value}), '
        f'{_ACT.value}, {_DTYPE.value}; matmul peak {peak_flops / 1e9:,.0f} GFLOP/s')
  rows = bench(_TOKENS.value, _D.value, _E.value, _K.value, _F.value, _ACT.value, _DTYPE.value,
               [float(c) for c in _CF.value], _STEPS.value, _SEQ.value)
  print(format_table(rows, peak_flops))
  print('Forward+backward, median of steps. Active FLOPs exclude the router (2*N*D*E per forward) '
        'and dispatch; MFU = GFLOP/s / matmul peak.')


if __name__ == '__main__':
  from launch import errors
  _define_flags()
  errors.run(main)

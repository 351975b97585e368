"""Training throughput benchmark: tokens/s and MFU for a config, against this machine's measured
matmul peak (taken in the same run).

  python -m launch.bench --config=configs/tiny.py --steps=20 [--dtypes=float32,bfloat16]

Uses random tokens, so it measures the step (forward, backward, optimizer) and not the data
pipeline. MFU = model FLOPs/s (PaLM App. B: 6N + 12 L H Q T per token) / measured peak.
"""
from __future__ import annotations

import time

from absl import flags, logging
from ml_collections import config_flags


def _define_flags() -> None:
  """CLI flags, defined only when this module is the program, so tests and other modules
  can import its functions without absl duplicate-flag clashes."""
  global _CONFIG, _STEPS, _DTYPES
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/tiny.py.')
  flags.mark_flag_as_required('config')
  _STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after 2 warm-up steps).')
  _DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes to compare.')


def throughput(model_cfg, batch_size: int, seq_len: int, step_s: float) -> dict:
  """Figures of one training step of `batch_size` rows of `seq_len` tokens taking `step_s`
  seconds: tokens/s and model FLOPs/s (`ModelConfig.flops_per_token`, PaLM App. B)."""
  tokens = batch_size * seq_len
  flops = model_cfg.flops_per_token(seq_len) * tokens
  return {'step_s': step_s, 'tokens_per_s': tokens / step_s, 'flops_per_s': flops / step_s}


def mfu(flops_per_s: float, peak_flops: float) -> float:
  """Model FLOPs utilization: achieved model FLOPs/s over the peak (a fraction)."""
  return flops_per_s / peak_flops


def bench_step(cfg, dtype: str, steps: int, clock=time.perf_counter) -> dict:
  """Compiles and times the train step of `cfg` in compute `dtype`: one compile step, one
  warm-up step, then `steps` timed steps; `clock` reads seconds."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding

  from model import sharding
  from model.config import ModelConfig
  from train import optim, state as state_lib, step as step_lib

  model_cfg = ModelConfig.from_dict({**cfg.model.to_dict(), 'dtype': dtype})
  t = cfg.train
  mesh, rules = sharding.mesh_from_config(cfg.mesh)
  tx, schedule = optim.make_optimizer(t, t.steps)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules)
  state = state_lib.init_state(spec, model_cfg, tx, t.seed)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules,
                                                          (t.batch_size, 1), mesh))
  step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, grad_accum=t.grad_accum,
                                          z_loss=t.z_loss),
                 in_shardings=(spec.state_shardings, batch_sh), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = jax.device_put(rng.integers(0, model_cfg.vocab_size, (t.batch_size, cfg.data.seq_len + 1),
                                      dtype=np.int32), batch_sh)
  with sharding.use_mesh(mesh, rules):
    t0 = clock()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = clock() - t0
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = clock()
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (clock() - t0) / steps
  return {'dtype': dtype, **throughput(model_cfg, t.batch_size, cfg.data.seq_len, dt),
          'compile_s': compile_s, 'params': model_cfg.param_count()}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax/absl INFO chatter off the console.
  import jax
  from train import peak

  cfg = _CONFIG.value
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}  jax {jax.__version__}')
  peaks = {d: peak.matmul_peak_flops(d) for d in ('float32', 'bfloat16')}
  for d, p in peaks.items():
    print(f'measured matmul peak ({d} inputs, float32 accumulation): {p / 1e9:,.0f} GFLOP/s')
  best = max(peaks.values())
  print(f'{"dtype":>9} {"step ms":>9} {"tokens/s":>10} {"GFLOP/s":>9} {"MFU":>7} {"MFU(own)":>9} {"compile s":>9}')
  for dtype in _DTYPES.value:
    r = bench_step(cfg, dtype, _STEPS.value)
    print(f'{dtype:>9} {1e3 * r["step_s"]:9.1f} {r["tokens_per_s"]:10,.0f} {r["flops_per_s"] / 1e9:9.1f} '
          f'{100 * mfu(r["flops_per_s"], best):6.1f}% {100 * mfu(r["flops_per_s"], peaks[dtype]):8.1f}% '
          f'{r["compile_s"]:9.1f}')
  print('MFU is against the best measured peak; MFU(own) against the peak of that dtype.')


if __name__ == '__main__':
  from launch import errors
  _define_flags()
  errors.run(main)

"""Training-step benchmark that tells the truth in one run: palmax's step against a bare-JAX
step of the same model and optimizer (train/bare_step.py), interleaved round by round in this
process, with MFU against the matmul peak measured in the same run and a per-component profile.

  python -m launch.bench --config=configs/tiny.py [--rounds=4 --steps=10 --dtypes=float32,bfloat16
                         --profile] [--config.model.d_model=...]

Random tokens, so it measures the step (forward, backward, optimizer), not the data pipeline.
FLOPs per token: PaLM App. B (6N + 12 L H Q T). Each round times `steps` steps of every
contender in turn, so a noisy neighbour slows all of them alike; the ratio column pairs palmax
with the bare step of the same round. `--profile` sums XLA op time per named scope (embed,
attention, mlp, head_loss = output projection + loss, optimizer) from a profiler trace.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

from absl import flags, logging
from ml_collections import config_flags

SCOPES = ('embed', 'attention', 'mlp', 'head_loss', 'optimizer')


def _define_flags() -> None:
  """CLI flags, defined only when this module is the program (tests import its functions)."""
  global _CONFIG, _STEPS, _ROUNDS, _DTYPES, _PROFILE, _BARE
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/tiny.py.')
  flags.mark_flag_as_required('config')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per contender per round.')
  _ROUNDS = flags.DEFINE_integer('rounds', 4, 'Interleaved rounds.')
  _DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes to compare.')
  _PROFILE = flags.DEFINE_bool('profile', True, 'Per-component op-time breakdown.')
  _BARE = flags.DEFINE_bool('bare', True, 'Also time the bare-JAX reference step.')


def throughput(model_cfg, batch_size: int, seq_len: int, step_s: float) -> dict:
  """Figures of one training step of `batch_size` rows of `seq_len` tokens taking `step_s`
  seconds: tokens/s and model FLOPs/s (`ModelConfig.flops_per_token`, PaLM App. B)."""
  tokens = batch_size * seq_len
  flops = model_cfg.flops_per_token(seq_len) * tokens
  return {'step_s': step_s, 'tokens_per_s': tokens / step_s, 'flops_per_s': flops / step_s}


def mfu(flops_per_s: float, peak_flops: float) -> float:
  """Model FLOPs utilization: achieved model FLOPs/s over the peak (a fraction)."""
  return flops_per_s / peak_flops


@dataclasses.dataclass
class Contender:
  """One compiled step ready to run: `run()` does one step and returns what to wait for."""
  name: str
  dtype: str
  run: Callable[[], Any]
  hlo_text: str
  compile_s: float
  model_cfg: Any


def palmax_contender(cfg, dtype: str, clock=time.perf_counter) -> Contender:
  """palmax's own train step (train/step.py, the trainer's options) on random tokens."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding

  from model import sharding
  from model.config import ModelConfig
  from train import objectives, optim, state as state_lib, step as step_lib

  t0 = clock()
  model_cfg = ModelConfig.from_dict({**cfg.model.to_dict(), 'dtype': dtype})
  t = cfg.train
  mesh, rules = sharding.mesh_from_config(cfg.mesh)
  tx, schedule = optim.make_optimizer(t, t.steps, model_cfg)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules, t.get('trainable', ''))
  state = state_lib.init_state(spec, model_cfg, tx, t.seed)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules,
                                                          (t.batch_size, 1), mesh))
  objective = objectives.get(t.get('objective', 'lm'))(cfg)
  step = jax.jit(step_lib.make_train_step(spec.graphdef, tx, schedule, grad_accum=t.grad_accum,
                                          objective=objective,
                                          trainable_mask=spec.trainable_mask),
                 in_shardings=(spec.state_shardings, batch_sh), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = jax.device_put(rng.integers(0, model_cfg.vocab_size, (t.batch_size, cfg.data.seq_len + 1),
                                      dtype=np.int32), batch_sh)
  with sharding.use_mesh(mesh, rules):
    compiled = step.lower(state, batch).compile()
  box = {'state': state}

  def run():
    box['state'], metrics = compiled(box['state'], batch)
    return metrics

  jax.block_until_ready(run())
  return Contender('palmax', dtype, run, compiled.as_text(), clock() - t0, model_cfg)


def bare_contender(cfg, dtype: str, clock=time.perf_counter) -> Contender:
  """The bare-JAX step of the same model and optimizer (train/bare_step.py)."""
  import jax
  import numpy as np

  from model.config import ModelConfig
  from train import bare_step, optim

  t0 = clock()
  model_cfg = ModelConfig.from_dict({**cfg.model.to_dict(), 'dtype': dtype})
  bare_step.check_supported(model_cfg)
  t = cfg.train
  if t.get('optimizer', 'adamw') != 'adamw':
    raise ValueError(f"launch.bench: the bare-JAX step uses AdamW, not config.train.optimizer="
                     f"{t.optimizer!r}; pass --nobare")
  tx, _ = optim.make_optimizer(t, t.steps, model_cfg)
  params = bare_step.init_params(model_cfg, t.seed)
  opt_state = tx.init(params)
  tokens = jax.numpy.asarray(np.random.default_rng(0).integers(
      0, model_cfg.vocab_size, (t.batch_size, cfg.data.seq_len + 1)), jax.numpy.int32)
  compiled = bare_step.make_step(model_cfg, tx).lower(params, opt_state, tokens).compile()
  box = {'state': (params, opt_state)}

  def run():
    p, o, loss = compiled(*box['state'], tokens)
    box['state'] = (p, o)
    return loss

  jax.block_until_ready(run())
  return Contender('bare JAX', dtype, run, compiled.as_text(), clock() - t0, model_cfg)


def time_steps(c: Contender, steps: int, clock=time.perf_counter) -> float:
  """Seconds per step over `steps` steps (the first result waited for at the end only)."""
  import jax
  t0 = clock()
  out = None
  for _ in range(steps):
    out = c.run()
  jax.block_until_ready(out)
  return (clock() - t0) / steps


def bench_step(cfg, dtype: str, steps: int, clock=time.perf_counter) -> dict:
  """palmax's step alone: compile (and one step), one warm-up step, then `steps` timed steps."""
  c = palmax_contender(cfg, dtype, clock)
  import jax
  jax.block_until_ready(c.run())
  dt = time_steps(c, steps, clock)
  return {'dtype': dtype, **throughput(c.model_cfg, cfg.train.batch_size, cfg.data.seq_len, dt),
          'compile_s': c.compile_s, 'params': c.model_cfg.param_count()}


def interleave(contenders: list[Contender], rounds: int, steps: int, peak_fn=None,
               clock=time.perf_counter) -> tuple[dict[str, list[float]], float]:
  """Seconds per step of each contender in each round, run in turn; and the best float32
  matmul peak measured between rounds (`peak_fn()`, FLOP/s)."""
  times = {f'{c.name} {c.dtype}': [] for c in contenders}
  peak = 0.0
  for _ in range(rounds):
    for c in contenders:
      times[f'{c.name} {c.dtype}'].append(time_steps(c, steps, clock))
    if peak_fn is not None:
      peak = max(peak, peak_fn())
  return times, peak


def summarize(values: list[float]) -> str:
  return f'{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]'


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax/absl INFO chatter off the console.
  import jax
  from train import op_profile, peak

  cfg = _CONFIG.value
  b, t = cfg.train.batch_size, cfg.data.seq_len
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}  jax {jax.__version__}  '
        f'batch {b} x seq {t}')
  contenders = []
  for dtype in _DTYPES.value:
    contenders.append(palmax_contender(cfg, dtype))
    if _BARE.value:
      contenders.append(bare_contender(cfg, dtype))
  model_cfg = contenders[0].model_cfg
  fpt = model_cfg.flops_per_token(t)
  print(f'model: {model_cfg.param_count():,} parameters, {fpt / 1e6:.1f} MFLOP/token (PaLM App. B)')
  times, fp32_peak = interleave(contenders, _ROUNDS.value, _STEPS.value,
                                lambda: peak.matmul_peak_flops('float32', n=2048, seconds=2.0))
  print(f'float32 matmul peak measured in this run (best of {_ROUNDS.value}): '
        f'{fp32_peak / 1e9:,.0f} GFLOP/s')
  print(f'{"contender":<18} {"tokens/s median [min-max]":>28} {"MFU":>6} {"compile s":>9}')
  tok = {k: [b * t / s for s in v] for k, v in times.items()}
  for c in contenders:
    key = f'{c.name} {c.dtype}'
    med = statistics.median(tok[key])
    print(f'{key:<18} {summarize(tok[key]):>28} {100 * mfu(med * fpt, fp32_peak):5.1f}% '
          f'{c.compile_s:9.1f}')
  if _BARE.value:
    for dtype in _DTYPES.value:
      ratios = [p / q for p, q in zip(tok[f'palmax {dtype}'], tok[f'bare JAX {dtype}'])]
      print(f'palmax / bare JAX, {dtype}, paired by round: {statistics.median(ratios):.3f} '
            f'[{min(ratios):.3f}-{max(ratios):.3f}]')
  if _PROFILE.value:
    print('\nXLA op time per step by component (ms, summed over threads):')
    print(f'{"contender":<18} ' + ' '.join(f'{s:>10}' for s in (*SCOPES, 'other')))
    for c in contenders:
      ms = op_profile.breakdown(c.hlo_text, c.run, 3, SCOPES)
      print(f'{c.name + " " + c.dtype:<18} ' + ' '.join(f'{ms[s]:10.1f}' for s in ms))


if __name__ == '__main__':
  from launch import errors
  _define_flags()
  errors.run(main)

"""The training loop: data -> sharded jitted step -> metrics, evaluation and checkpoints.

`train(cfg, workdir)` is the one entry point (launcher, sweeps and tests call it). It resumes
from the workdir's latest checkpoint when there is one, saves on SIGTERM/SIGINT, and stops with
`TrainingDivergedError` (keeping the last good checkpoint) when the loss turns non-finite.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from model import pipeline, sharding
from model.config import ConfigError, ModelConfig
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import metrics as metrics_lib
from train import optim, peak, state as state_lib, step as step_lib


class TrainingDivergedError(RuntimeError):
  """The loss or gradient became NaN/inf and config.train.nan_policy is 'stop'."""


@dataclasses.dataclass
class RunResult:
  step: int
  metrics: dict          # last training metrics
  eval: dict             # last evaluation: loss, perplexity, bits_per_byte
  interrupted: bool = False


def check_config(cfg, model_cfg: ModelConfig, mesh, rules=None, pipe=None) -> None:
  """Cross-section consistency checks, each naming the field (before anything is built)."""
  t = cfg.train
  n_batch_shards = sharding.batch_shards(mesh, rules or sharding.check_rules(cfg.mesh.rules))
  if model_cfg.moe is not None and model_cfg.moe.num_experts % mesh.shape['expert']:
    raise ConfigError(f'config.model.moe.num_experts={model_cfg.moe.num_experts} is not divisible '
                      f'by the mesh expert axis size {mesh.shape["expert"]}')
  if pipe is not None:
    pipe.check_fits(model_cfg.layer_groups(), t.batch_size // max(t.grad_accum, 1), n_batch_shards)
  if t.batch_size <= 0 or t.steps <= 0:
    raise ConfigError(f'config.train.batch_size ({t.batch_size}) and config.train.steps '
                      f'({t.steps}) must be positive')
  if t.batch_size % t.grad_accum:
    raise ConfigError(f'config.train.batch_size={t.batch_size} is not divisible by '
                      f'config.train.grad_accum={t.grad_accum}')
  if (t.batch_size // t.grad_accum) % n_batch_shards:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} (per microbatch {t.batch_size // t.grad_accum}) '
        f'is not divisible by the {n_batch_shards} batch shards of the mesh {dict(mesh.shape)}')
  if cfg.data.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f'config.data.seq_len={cfg.data.seq_len} exceeds '
                      f'config.model.max_seq_len={model_cfg.max_seq_len}')
  if t.nan_policy not in ('stop', 'skip'):
    raise ConfigError(f"config.train.nan_policy={t.nan_policy!r}; expected 'stop' or 'skip'")


class _StopFlag:
  """Turns SIGTERM (preemption) and the first Ctrl-C into a request to save and exit."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: stop now.
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def train(cfg, workdir: str, log=print, stop_after: int | None = None) -> RunResult:
  """Trains (or resumes) to config.train.steps. `stop_after` ends early after that many steps
  with a checkpoint, as a preemption would (for tests and time-boxed runs)."""
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  t = cfg.train
  mesh, rules = sharding.mesh_from_config(cfg.mesh)
  pipe = pipeline.PipelineConfig.from_config(cfg.get('pipeline'), mesh.shape['pipeline'])
  check_config(cfg, model_cfg, mesh, rules, pipe)

  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules,
                                                          (t.batch_size, 1), mesh))
  # Each process reads only the rows its devices hold (processes holding the same rows, e.g.
  # different pipeline stages, read the same block).
  data = data_lib.build_data(cfg, workdir, *sharding.process_rows(batch_sh, t.batch_size))
  if data.tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f'the tokenizer has {data.tokenizer.vocab_size} tokens but '
                      f'config.model.vocab_size={model_cfg.vocab_size}')

  tx, schedule = optim.make_optimizer(t, t.steps)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  expect = {'model': model_cfg.to_dict(), 'corpus_fingerprint': data.info['fingerprint']}

  if ckpt.latest_step() is not None:
    state, record = ckpt.restore(spec.abstract_state, expect=expect)
    data.train.restore(record['data'])
    log(f'Resumed from {ckpt.directory} at step {int(state["step"])}')
  else:
    state = state_lib.init_state(spec, model_cfg, tx, t.seed)
    if t.get('init_from'):  # Continued pretraining / fine-tuning: its weights, a fresh optimizer.
      from train import checkpoint_stream
      state['params'], src_step = checkpoint_stream.init_params(
          t.init_from, model_cfg, spec.abstract_state['params'])
      log(f'Initialised parameters from {t.init_from} (its step {src_step}); optimizer and step '
          'start fresh')
  if jax.process_index() == 0:
    # Written only after any existing checkpoint was found to fit, so a refused run never
    # overwrites the config that sampling reads.
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json(indent=2))
  n_params, n_active = model_cfg.param_count(), model_cfg.active_param_count()
  active = f' ({n_active / 1e6:.2f}M active per token)' if n_active != n_params else ''
  log(f'Model: {n_params / 1e6:.2f}M parameters{active}; mesh {dict(mesh.shape)}')
  if pipe.enabled:
    log(f'Pipeline: {pipe.schedule}, {pipe.stages} stages x {pipe.repeats} repeats, '
        f'{pipe.microbatches} microbatches; bubble fraction {pipe.bubble_fraction:.3f}')
  log(f'Data: {data.info["source"]} corpus {data.info["fingerprint"][:12]}, '
      f'{data.info["train_tokens"]:,} training and {data.info["val_tokens"]:,} validation tokens, '
      f'{data.val_bytes_per_token:.2f} bytes/token (tokenizer vocab {data.tokenizer.vocab_size})')

  weights_sh = batch_sh
  replicated = NamedSharding(mesh, P())
  train_step = jax.jit(
      step_lib.make_train_step(spec.graphdef, tx, schedule, grad_accum=t.grad_accum, z_loss=t.z_loss),
      in_shardings=(spec.state_shardings, batch_sh), out_shardings=(spec.state_shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(spec.graphdef),
                      in_shardings=(spec.param_shardings, batch_sh, weights_sh),
                      out_shardings=replicated)

  peak_flops = t.peak_flops or peak.matmul_peak_flops(model_cfg.dtype)
  tokens_per_step = t.batch_size * cfg.data.seq_len
  flops_per_step = model_cfg.flops_per_token(cfg.data.seq_len) * tokens_per_step
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=t.tensorboard)

  def record():
    return {'data': data.train.state(), 'model': model_cfg.to_dict(),
            'corpus_fingerprint': data.info['fingerprint'], 'corpus': data.info,
            'config': cfg.to_json_best_effort()}

  def evaluate(params) -> dict:
    loss_sum, weight_sum = 0.0, 0.0
    for tokens, weights in data.val:  # Already capped at config.train.eval_batches.
      ls, ws = eval_step(params, _global(tokens, batch_sh), _global(weights, weights_sh))
      loss_sum += float(ls)
      weight_sum += float(ws)
    loss = loss_sum / max(weight_sum, 1.0)
    return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 50.0)),
            'eval_bits_per_byte': loss / math.log(2) / data.val_bytes_per_token}

  step = int(jax.device_get(state['step']))
  last_metrics: dict = {}
  last_eval: dict = {}
  interrupted = False
  t_last, step_last, t_first = None, step, None
  try:
    with sharding.use_mesh(mesh, rules), pipeline.use_pipeline(pipe), _StopFlag() as stop:
      while step < t.steps:
        batch = _local_global(next(data.train), batch_sh, t.batch_size)
        state, m = train_step(state, batch)
        step += 1
        m = metrics_lib.flatten(jax.device_get(m))  # Per-layer MoE arrays -> scalars.
        if not m['finite']:
          if t.nan_policy == 'stop':
            ckpt.wait()
            kept = ckpt.latest_step()
            raise TrainingDivergedError(
                f'loss became non-finite at step {step} (loss={m["loss"]}, grad_norm={m["grad_norm"]}); '
                f'stopped. The last good checkpoint ({"step " + str(kept) if kept is not None else "none"}) '
                f'in {ckpt.directory} is kept. Lower config.train.lr or set config.train.nan_policy=skip.')
          log(f'step {step}: non-finite loss, update skipped (config.train.nan_policy=skip)')
        now = time.perf_counter()
        if t_last is None:  # The first step includes compilation: start timing after it.
          t_last, step_last, t_first, step_first = now, step, now, step
        if step % t.log_every == 0 or step == t.steps:
          dt = now - t_last
          if step > step_last and dt > 0:
            tps = (step - step_last) * tokens_per_step / dt
            m['tokens_per_s'] = tps
            m['mfu'] = (step - step_last) * flops_per_step / dt / peak_flops
            eta = (t.steps - step) * (now - t_first) / max(1, step - step_first)
            log(metrics_lib.progress_line(step, t.steps, m, eta))
            t_last, step_last = now, step
          writer.write(step, m)
          last_metrics = m
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
          last_eval = evaluate(state['params'])
          writer.write(step, last_eval)
          log(f'eval @ {step}: loss {last_eval["eval_loss"]:.4f}  ppl {last_eval["eval_perplexity"]:.2f}'
              f'  bits/byte {last_eval["eval_bits_per_byte"]:.4f}')
          t_last = time.perf_counter()  # Keep eval time out of tokens/s.
          step_last = step
        stopping = stop.signum is not None or step == stop_after
        if stopping or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
          ckpt.save(step, state, record(), force=True)
        if stopping:
          ckpt.wait()
          why = f'Received signal {stop.signum}' if stop.signum is not None else 'Stopping early'
          log(f'{why}: saved step {step} to {ckpt.directory}; exiting. '
              f'Run the same command again to resume.')
          interrupted = True
          break
  finally:
    ckpt.close()
    writer.close()
  return RunResult(step=step, metrics=last_metrics, eval=last_eval, interrupted=interrupted)


def _global(x: np.ndarray, sh: NamedSharding) -> jax.Array:
  """A global array from data every process holds in full (validation)."""
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def _local_global(x: np.ndarray, sh: NamedSharding, global_rows: int) -> jax.Array:
  """A global array from this process's rows of the global batch."""
  return jax.make_array_from_process_local_data(sh, x, (global_rows,) + x.shape[1:])

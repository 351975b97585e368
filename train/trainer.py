"""The training loop: data -> sharded jitted step -> metrics, evaluation and checkpoints.

`train(cfg, workdir)` is the one entry point (launcher, sweeps and tests call it). It resumes
from the workdir's latest checkpoint when there is one, saves on SIGTERM/SIGINT, and stops with
`TrainingDivergedError` (keeping the last good checkpoint) when the loss turns non-finite.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
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
from train import config_schema, failpoints, optim, paths, peak, resume, state as state_lib
from train import step as step_lib
from train.workdir_lock import WorkdirLock


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
  with a checkpoint, as a preemption would (for tests and time-boxed runs).

  The workdir is a transaction: the config is validated, the workdir locked (one writer), and a
  checkpoint present is verified and must fit this run's model and data, all before anything in
  the workdir is written; a refused run leaves it byte-identical."""
  config_schema.validate(cfg)
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  mesh, rules = sharding.mesh_from_config(cfg.mesh)
  pipe = pipeline.PipelineConfig.from_config(cfg.get('pipeline'), mesh.shape['pipeline'])
  check_config(cfg, model_cfg, mesh, rules, pipe)
  paths.makedirs(workdir)
  if jax.process_index() != 0:
    lock = contextlib.nullcontext()
  elif paths.is_remote(workdir):   # Object stores have no flock (train/workdir_lock.py).
    log(f'note: {workdir} is in an object store, where the workdir is not locked: run one trainer '
        'per workdir')
    lock = contextlib.nullcontext()
  else:
    lock = WorkdirLock(workdir, log)
  with lock:
    return _train(cfg, workdir, log, stop_after, model_cfg, mesh, rules, pipe)


def _train(cfg, workdir, log, stop_after, model_cfg, mesh, rules, pipe) -> RunResult:
  t = cfg.train
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules,
                                                          (t.batch_size, 1), mesh))
  tx, _ = optim.make_optimizer(t, t.steps)   # The state's structure; the schedule comes below.
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoints,
                               log=log)
  record, where = None, ''
  try:
    if ckpt.latest_step() is not None:
      state, record = ckpt.restore(spec.abstract_state, expect={'model': model_cfg.to_dict()},
                                   on_corrupt=t.on_corrupt, verify=t.verify_checkpoints, log=log)
      where = f'checkpoint step {int(state["step"])} in {ckpt.directory}'
      resume.check_same_data(cfg, record, where)
    # Each process reads only the rows its devices hold (processes holding the same rows, e.g.
    # different pipeline stages, read the same block). Nothing is written unless it all fits.
    data = data_lib.build_data(cfg, workdir, *sharding.process_rows(batch_sh, t.batch_size),
                               resume=record, resume_from=where)
  except BaseException:
    ckpt.close()
    raise
  if data.tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f'the tokenizer has {data.tokenizer.vocab_size} tokens but '
                      f'config.model.vocab_size={model_cfg.vocab_size}')
  total = resume.schedule_steps(cfg, record, log)
  tx, schedule = optim.make_optimizer(t, total)

  if record is not None:
    data.train.restore(record['data'])
    step = int(jax.device_get(state['step']))
    log(f'Resumed from {ckpt.directory} at step {step}')
    if step >= t.steps:
      ckpt.close()
      log(f'config.train.steps={t.steps} and the checkpoint is at step {step}: nothing to train. '
          'Raise config.train.steps to train further.')
      return RunResult(step=step, metrics={}, eval={})
  else:
    state = state_lib.init_state(spec, model_cfg, tx, t.seed)
    if t.get('init_from'):  # Continued pretraining / fine-tuning: its weights, a fresh optimizer.
      from train import checkpoint_stream
      state['params'], src_step = checkpoint_stream.init_params(
          t.init_from, model_cfg, spec.abstract_state['params'])
      log(f'Initialised parameters from {t.init_from} (its step {src_step}); optimizer and step '
          'start fresh')
  if jax.process_index() == 0:
    # Written only once the run is known to fit the workdir: a refused run never overwrites the
    # config that sampling reads.
    paths.write_text(paths.join(workdir, 'config.json'), cfg.to_json(indent=2))
    resume.trim_metrics(workdir, int(jax.device_get(state['step'])))
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

  peak_flops, peak_note = _peak(t, model_cfg, log)
  tokens_per_step = t.batch_size * cfg.data.seq_len
  flops_per_step = model_cfg.flops_per_token(cfg.data.seq_len) * tokens_per_step
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=t.tensorboard)

  def record_now():
    return {'data': data.train.state(), 'model': model_cfg.to_dict(),
            'data_config': cfg.data.to_dict(), 'schedule_steps': total,
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
  mfu_warned = False
  t_last, step_last, t_first = None, step, None
  try:
    with sharding.use_mesh(mesh, rules), pipeline.use_pipeline(pipe), _StopFlag() as stop:
      while step < t.steps:
        batch = _local_global(next(data.train), batch_sh, t.batch_size)
        state, m = train_step(state, batch)
        step += 1
        m = metrics_lib.flatten(jax.device_get(m))  # Per-layer MoE arrays -> scalars.
        failpoints.reach('step')
        if not m['finite']:
          if t.nan_policy == 'stop':
            ckpt.wait()
            kept = ckpt.latest_verified_step()
            raise TrainingDivergedError(
                f'loss became non-finite at step {step} (loss={m["loss"]}, grad_norm={m["grad_norm"]}); '
                f'stopped. The last good (verified) checkpoint '
                f'({"step " + str(kept) if kept is not None else "none"}) in {ckpt.directory} is '
                'kept. Lower config.train.lr or set config.train.nan_policy=skip.')
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
            if m['mfu'] > 1 and not mfu_warned:
              log(f'note: MFU reads {100 * m["mfu"]:.0f}%, so the matmul peak '
                  f'({peak_flops / 1e9:.3g} GFLOP/s, {peak_note}) is too low; set '
                  'config.train.peak_flops to this machine\'s peak for a reliable MFU')
              mfu_warned = True
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
          ckpt.save(step, state, record_now(), force=True)
          failpoints.reach('checkpoint.save')
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


def _peak(t, model_cfg: ModelConfig, log) -> tuple[float, str]:
  """The MFU denominator: config.train.peak_flops, or the best of several measured trials; a
  wide spread between trials (a busy machine) is flagged."""
  if t.peak_flops:
    return float(t.peak_flops), 'from config.train.peak_flops'
  trials = [peak.matmul_peak_flops(model_cfg.dtype, seconds=0.3) for _ in range(3)]
  best = max(trials)
  if min(trials) < 0.8 * best:
    log(f'note: matmul peak trials vary ({", ".join(f"{x / 1e9:.0f}" for x in trials)} GFLOP/s): '
        'the machine is busy, so MFU is approximate; set config.train.peak_flops to fix it')
    return best, 'best of 3 trials that varied: unreliable'
  return best, 'best of 3 trials measured at start'


def _global(x: np.ndarray, sh: NamedSharding) -> jax.Array:
  """A global array from data every process holds in full (validation)."""
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def _local_global(x: np.ndarray, sh: NamedSharding, global_rows: int) -> jax.Array:
  """A global array from this process's rows of the global batch."""
  return jax.make_array_from_process_local_data(sh, x, (global_rows,) + x.shape[1:])

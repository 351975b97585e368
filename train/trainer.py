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

from model import pipeline, sharding
from model.config import ModelConfig
from train import config_schema, failpoints, paths, peak
from train import metrics as metrics_lib
from train import run as run_lib
from train.workdir_lock import WorkdirLock

check_config = run_lib.check_config   # Where callers found it before the build moved out.


class TrainingDivergedError(RuntimeError):
  """The loss or gradient became NaN/inf and config.train.nan_policy is 'stop'."""


@dataclasses.dataclass
class RunResult:
  step: int
  metrics: dict          # last training metrics
  eval: dict             # last evaluation: loss, perplexity, bits_per_byte
  interrupted: bool = False
  history: list = dataclasses.field(default_factory=list)   # every logged step's metrics


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
    run = run_lib.build(cfg, workdir, log)
    return loop(run, log, stop_after)


def loop(run: run_lib.Run, log=print, stop_after: int | None = None) -> RunResult:
  """Steps `run` to config.train.steps: metrics, evaluation, checkpoints, preemption."""
  cfg, t, model_cfg, data, ckpt = run.cfg, run.cfg.train, run.model_cfg, run.data, run.ckpt
  step = run.step
  if run.resumed:
    log(f'Resumed from {ckpt.directory} at step {step}')
    if step >= t.steps:
      ckpt.close()
      log(f'config.train.steps={t.steps} and the checkpoint is at step {step}: nothing to train. '
          'Raise config.train.steps to train further.')
      return RunResult(step=step, metrics={}, eval={})
  run.commit()
  n_params, n_active = model_cfg.param_count(), model_cfg.active_param_count()
  active = f' ({n_active / 1e6:.2f}M active per token)' if n_active != n_params else ''
  log(f'Model: {n_params / 1e6:.2f}M parameters{active}; mesh {dict(run.mesh.shape)}')
  pipe = run.pipe
  if pipe.enabled:
    log(f'Pipeline: {pipe.schedule}, {pipe.stages} stages x {pipe.repeats} repeats, '
        f'{pipe.microbatches} microbatches; bubble fraction {pipe.bubble_fraction:.3f}')
  per_byte = (f'{data.val_bytes_per_token:.2f} bytes/token, ' if
              math.isfinite(data.val_bytes_per_token) else '')
  log(f'Data: {data.info["source"]} corpus {data.info["fingerprint"][:12]}, '
      f'{data.info["train_tokens"]:,} training and {data.info["val_tokens"]:,} validation tokens, '
      f'{per_byte}tokenizer vocab {data.tokenizer.vocab_size}')

  peak_flops, peak_note = _peak(t, model_cfg, log)
  # A preference example is two rows (chosen, rejected); MFU counts the policy's work only.
  tokens_per_step = t.batch_size * cfg.data.seq_len * run.objective.rows_per_example
  flops_per_step = model_cfg.flops_per_token(cfg.data.seq_len) * tokens_per_step
  writer = metrics_lib.MetricsWriter(run.workdir, tensorboard=t.tensorboard)

  def evaluate(params) -> dict:
    if not data.val:   # RL has no held-out loss: its evaluation is config.train.eval_tasks.
      return {}
    totals: dict[str, float] = {}
    for tokens, weights in data.val:  # Already capped at config.train.eval_batches.
      for k, v in jax.device_get(run.eval_step(params, run.batch(tokens, weights))).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    weight = max(totals.get('weight', 0.0), 1.0)
    loss = totals.get('loss_sum', 0.0) / weight
    out = {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 50.0)),
           'eval_bits_per_byte': loss / math.log(2) / data.val_bytes_per_token}
    for k in totals:   # An objective's other sums (train/objectives/base.py:eval_sums).
      if k.endswith('_sum') and k != 'loss_sum':
        name = k[:-len('_sum')]
        out[f'eval_{name}'] = totals[k] / max(totals.get(f'{name}_count', weight), 1e-9)
    return out

  tasks = None
  if t.get('eval_tasks'):   # Task evaluation beside the loss (train/evaluation/).
    from train.evaluation.runner import PeriodicEval
    from train.peft_run import prefix_ids
    tasks = PeriodicEval(t.eval_tasks, run.workdir, run.spec.graphdef, model_cfg, data.tokenizer,
                         limit=t.get('eval_tasks_limit', 0), prefix_ids=prefix_ids(cfg, model_cfg))
  state, history = run.state, []
  last_metrics: dict = {}
  last_eval: dict = {}
  interrupted = False
  mfu_warned = False
  t_last, step_last, t_first = None, step, None
  try:
    with sharding.use_mesh(run.mesh, run.rules), pipeline.use_pipeline(pipe), _StopFlag() as stop:
      while step < t.steps:
        state, m = run.train_step(state, run.next_batch(state, log))
        step += 1
        m = metrics_lib.flatten(jax.device_get(m))  # Per-layer MoE arrays -> scalars.
        m.update(getattr(data.train, 'metrics', {}))   # RL: the rollout's rewards.
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
          history.append(dict(m, step=step))
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
          last_eval = evaluate(state['params'])
          if last_eval:
            writer.write(step, last_eval)
            history.append(dict(last_eval, step=step))
            log(f'eval @ {step}: ' + metrics_lib.eval_line(last_eval))
          if tasks is not None:
            scores = tasks(state['params'], step, log=lambda line: log(f'eval @ {step}: {line}'))
            writer.write(step, scores)
            last_eval = dict(last_eval, **scores)
          t_last = time.perf_counter()  # Keep eval time out of tokens/s.
          step_last = step
        stopping = stop.signum is not None or step == stop_after
        if stopping or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
          ckpt.save(step, run.saved(state), run.record(), force=True)
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
    if tasks is not None:
      tasks.close()
  run.state = state
  return RunResult(step=step, metrics=last_metrics, eval=last_eval, interrupted=interrupted,
                   history=history)


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

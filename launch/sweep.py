"""Run a scaling sweep: plan the IsoFLOP points, train each, collect, fit, plot and report.

  python -m launch.sweep --config=configs/sweeps/cpu.py --workdir=runs/sweep_cpu \
      [--plan_only] [--retry_failed] [--submit=local|print] [--fit_only]

(`python -m launch.main` with the same --config/--workdir does the same: it hands a config with a
`sweep` section to `run_from_launcher`.) The plan is printed first. With --submit=local the
points train one after another in this process; --submit=print prints one ordinary
`python -m launch.main ... --config.sweep.point=NAME --config.model.d_model=...` line per
unfinished point (what a TPU VM launcher submits as one job each); --fit_only then collects
what finished and fits.

Layout: WORKDIR/plan.txt; WORKDIR/data/ (tokenizer and token caches, built once and shared);
WORKDIR/points/NAME/ (an ordinary palmax workdir plus sweep_point.json: 'done' or 'failed' with
the error); WORKDIR/results.{csv,json}, fits.json, *.png and report.md. A point whose
sweep_point.json says 'done' is skipped on re-run; a 'failed' one is retried only with
--retry_failed (or --config.sweep.retry_failed=True).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from typing import Callable, Sequence

from absl import flags, logging
from ml_collections import config_flags

from train import paths

POINT_RECORD = 'sweep_point.json'
DATA_FILES = ('tokens_train.npy', 'tokens_val.npy', 'tokens.json')

def _define_flags() -> None:
  """The CLI flags, defined only when this module is the program (launch.main imports it too and
  owns --config/--workdir there)."""
  global _CONFIG, _WORKDIR, _PLAN_ONLY, _RETRY, _SUBMIT, _FIT_ONLY
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Sweep config, e.g. configs/sweeps/cpu.py.')
  flags.mark_flag_as_required('config')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory (points, results, report).',
                                 required=True)
  _PLAN_ONLY = flags.DEFINE_bool('plan_only', False, 'Print the plan and exit.')
  _RETRY = flags.DEFINE_bool('retry_failed', False, 'Also re-run points recorded as failed.')
  _SUBMIT = flags.DEFINE_enum('submit', 'local', ['local', 'print'],
                              'local: train the points here, one after another; print: print one '
                              'launch.main command line per unfinished point.')
  _FIT_ONLY = flags.DEFINE_bool('fit_only', False, 'Train nothing: collect finished points and fit.')


def _exit_if_failed(summary: 'SweepSummary') -> None:
  if summary.failed:
    print(f'error: {len(summary.failed)} point(s) failed: {summary.failed}; see their '
          f'{POINT_RECORD}; rerun with --retry_failed', file=sys.stderr)
    sys.exit(1)


@dataclasses.dataclass
class SweepSummary:
  done: list[str]
  failed: list[str]
  pending: list[str]
  trained: list[str]            # Trained by this call.
  interrupted: bool = False
  analysis: dict | None = None  # report.analyze's result (fits), when it ran.


def _log_to(path: str, log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
  def write(line: str) -> None:
    paths.append_text(path, line + '\n')
    log(f'[{prefix}] {line}')
  return write


def read_record(point_dir: str) -> dict | None:
  return paths.read_json(paths.join(point_dir, POINT_RECORD))


def _write_record(point_dir: str, record: dict) -> None:
  paths.write_json(paths.join(point_dir, POINT_RECORD), record)


def prepare_shared_data(point_cfg, workdir: str, log=print) -> str:
  """Trains the tokenizer and tokenizes the corpus once, in WORKDIR/data; returns that dir."""
  from train import data as data_lib
  data_dir = paths.join(workdir, 'data')
  start = time.time()
  data_lib.build_data(point_cfg, data_dir)
  log(f'Shared data cache in {data_dir} ({time.time() - start:.0f} s)')
  return data_dir


def share_data(point_cfg, point_dir: str, data_dir: str | None) -> None:
  """Points the run at the shared tokenizer and links the shared token caches into its workdir,
  so the trainer's own caches (train/data.py) hit instead of retraining and re-tokenizing."""
  if not data_dir:
    return
  paths.makedirs(point_dir)
  if not point_cfg.data.tokenizer.path:
    point_cfg.data.tokenizer.path = paths.absolute(paths.join(data_dir, 'tokenizer.model'))
  for name in DATA_FILES:
    src, dst = paths.join(data_dir, name), paths.join(point_dir, name)
    if paths.exists(src) and not paths.exists(dst):
      if paths.is_remote(src) or paths.is_remote(dst):
        paths.write_bytes(dst, paths.read_bytes(src))  # Object stores have no hard links.
        continue
      try:
        os.link(src, dst)
      except OSError:
        shutil.copyfile(src, dst)


def run_point(point_cfg, point_dir: str, name: str, log=print, train_fn=None) -> dict:
  """Trains one point (resuming if it has a checkpoint) and writes its sweep_point.json.
  Exceptions are recorded as 'failed' (with the error) and not raised; KeyboardInterrupt is."""
  from train import trainer
  from train.scaling import counting
  train_fn = train_fn or trainer.train
  paths.makedirs(point_dir)
  seq_len = int(point_cfg.data.seq_len)
  tokens = int(point_cfg.train.steps) * int(point_cfg.train.batch_size) * seq_len
  record = {'name': name, 'status': 'failed', 'started': time.time(), 'tokens': tokens}
  start = time.time()
  try:
    counts = counting.param_counts(point_cfg.model)
    record.update(params=counts.total, flops=counting.training_flops(point_cfg.model, seq_len, tokens))
    result = train_fn(point_cfg, point_dir, log=_log_to(paths.join(point_dir, 'train.log'), log, name))
  except Exception as e:  # noqa: BLE001 - any failure of one point is recorded, the sweep goes on.
    record.update(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc()[-4000:],
                  wall_s=time.time() - start)
    _write_record(point_dir, record)
    log(f'[{name}] FAILED: {record["error"]}')
    return record
  if result.interrupted:
    return {'name': name, 'status': 'interrupted'}
  curve = read_curve(point_dir)
  losses = [loss for _, loss in curve]
  tps = _metrics(point_dir, 'tokens_per_s')
  record.update(
      status='done', step=result.step, wall_s=time.time() - start,
      eval_loss=result.eval.get('eval_loss'), eval_bits_per_byte=result.eval.get('eval_bits_per_byte'),
      train_loss=sum(losses[-3:]) / max(len(losses[-3:]), 1) if losses else None,
      tokens_per_s=sorted(tps)[len(tps) // 2] if tps else None)
  _write_record(point_dir, record)
  log(f'[{name}] done in {record["wall_s"]:.0f} s: eval loss {record["eval_loss"]:.4f}')
  return record


def _metric_rows(point_dir: str):
  """The rows of the run's metrics.jsonl, streamed; raises OSError/ValueError as reading does."""
  with paths.open_read(paths.join(point_dir, 'metrics.jsonl'), 'rb') as raw:
    for line in io.TextIOWrapper(raw, encoding='utf-8'):
      yield json.loads(line)


def _metrics(point_dir: str, key: str) -> list[float]:
  out = []
  try:
    for row in _metric_rows(point_dir):
      if key in row:
        out.append(float(row[key]))
  except (OSError, ValueError):
    pass
  return out


def read_curve(point_dir: str) -> list[tuple[int, float]]:
  """(step, training loss) from the run's metrics.jsonl, the last value per step (resumes append)."""
  by_step = {}
  try:
    for row in _metric_rows(point_dir):
      if 'loss' in row:
        by_step[int(row['step'])] = float(row['loss'])
  except (OSError, ValueError):
    pass
  return sorted(by_step.items())


def point_command(config_path: str, workdir: str, point, passthrough: Sequence[str] = ()) -> str:
  """The launch.main command line that trains one point as an ordinary run."""
  args = [f'--config={config_path}', f'--workdir={paths.join(workdir, "points", point.name)}',
          *passthrough, f'--config.sweep.point={point.name}']
  args += [f'--config.{k}={v}' for k, v in point.overrides.items()]
  return 'python -m launch.main ' + ' '.join(shlex.quote(a) for a in args)


def run_sweep(cfg, workdir: str, *, retry_failed: bool = False, plan_only: bool = False,
              submit: str = 'local', fit_only: bool = False, config_path: str = '',
              passthrough: Sequence[str] = (), log=print, train_fn=None) -> SweepSummary:
  """Plans, (optionally) trains, collects and analyses the sweep in `cfg.sweep`; see the module doc."""
  from train.scaling import plan as plan_lib
  from train.scaling import report
  if submit not in ('local', 'print'):
    raise ValueError(f"submit={submit!r}; expected 'local' or 'print'")
  points = plan_lib.plan_sweep(cfg)
  table = plan_lib.format_plan(points, float(cfg.sweep.flops_per_s), float(cfg.sweep.overhead_s))
  log(table)
  paths.makedirs(workdir)
  paths.write_text(paths.join(workdir, 'plan.txt'), table + '\n')
  summary = SweepSummary([], [], [], [])
  if plan_only:
    return summary
  retry_failed = retry_failed or bool(cfg.sweep.get('retry_failed', False))
  data_dir = None
  for point in points:
    point_dir = paths.join(workdir, 'points', point.name)
    record = read_record(point_dir) or {}
    status = record.get('status')
    if status == 'done':
      summary.done.append(point.name)
      continue
    if status == 'failed' and not retry_failed:
      log(f'[{point.name}] failed before ({record.get("error")}); skipped. Pass --retry_failed to rerun.')
      summary.failed.append(point.name)
      continue
    if fit_only or submit == 'print' or summary.interrupted:
      summary.pending.append(point.name)
      if submit == 'print' and not fit_only:
        print(point_command(config_path or '<config>', workdir, point, passthrough))
      continue
    point_cfg = plan_lib.point_config(cfg, point)
    if data_dir is None:
      data_dir = prepare_shared_data(point_cfg, workdir, log)
    share_data(point_cfg, point_dir, data_dir)
    log(f'[{point.name}] training: N={point.params:,} D={point.tokens:,} C={point.flops:.3g}')
    record = run_point(point_cfg, point_dir, point.name, log, train_fn)
    summary.trained.append(point.name)
    if record['status'] == 'done':
      summary.done.append(point.name)
    elif record['status'] == 'failed':
      summary.failed.append(point.name)
    else:
      summary.interrupted = True
      summary.pending.append(point.name)
  if submit == 'print' and not fit_only:
    return summary
  rows, curves = collect(points, workdir)
  report.write_results(rows, workdir)
  summary.analysis = report.analyze(rows, curves, workdir, cfg, log=log)
  log(f'Sweep {workdir}: {len(summary.done)} done, {len(summary.failed)} failed '
      f'{summary.failed or ""}, {len(summary.pending)} pending. Report: '
      f'{paths.join(workdir, "report.md")}')
  return summary


def collect(points, workdir: str) -> tuple[list[dict], list[dict]]:
  """One row per planned point (plan fields + measured results), and the finished points'
  training curves as (name, params, flops_per_token, flops list, loss list)."""
  rows, curves = [], []
  for p in points:
    point_dir = paths.join(workdir, 'points', p.name)
    record = read_record(point_dir) or {'status': 'pending'}
    o = p.overrides
    row = {'name': p.name, 'status': record.get('status', 'pending'), 'budget': p.budget,
           'd_model': o['model.d_model'], 'num_layers': o['model.num_layers'],
           'num_heads': o['model.num_heads'], 'params': p.params,
           'non_embedding_params': p.non_embedding_params, 'active_params': p.active_params,
           'flops_per_token': p.flops_per_token, 'tokens': p.tokens, 'flops': p.flops,
           'tokens_per_param': p.tokens_per_param, 'steps': p.steps, 'batch_size': p.batch_size,
           'seq_len': p.seq_len, 'lr': o['train.lr']}
    for key in ('train_loss', 'eval_loss', 'eval_bits_per_byte', 'tokens_per_s', 'wall_s', 'error'):
      row[key] = record.get(key)
    rows.append(row)
    if row['status'] == 'done':
      curve = read_curve(point_dir)
      curves.append({'name': p.name, 'params': p.params, 'flops_per_token': p.flops_per_token,
                     'flops': [s * p.tokens_per_step * p.flops_per_token for s, _ in curve],
                     'loss': [loss for _, loss in curve]})
  return rows, curves


def run_from_launcher(cfg, workdir: str, log=print) -> SweepSummary | dict:
  """launch.main's entry for sweep configs: one point if config.sweep.point is set (an ordinary
  run whose result the sweep collects later), else the whole sweep locally."""
  if cfg.sweep.get('point'):
    name = cfg.sweep.point
    point_cfg = copy.deepcopy(cfg)
    with point_cfg.unlocked():  # Configs from config_flags are locked.
      del point_cfg['sweep']
    record = run_point(point_cfg, workdir, name, log)
    if record['status'] == 'failed':
      print(f'error: sweep point {name} failed: {record["error"]} (see {POINT_RECORD})',
            file=sys.stderr)
      sys.exit(1)
    return record
  summary = run_sweep(cfg, workdir, log=log, config_path=_config_path(), passthrough=_passthrough())
  _exit_if_failed(summary)
  return summary


def _config_path() -> str:
  try:
    return config_flags.get_config_filename(flags.FLAGS['config'])
  except Exception:  # noqa: BLE001 - only used to print command lines.
    return '<config>'


def _passthrough() -> list[str]:
  """--config.* overrides given to this command, to repeat on each point's command line."""
  return [a for a in sys.argv[1:] if a.startswith('--config.') and not a.startswith('--config.sweep.point')]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  summary = run_sweep(_CONFIG.value, _WORKDIR.value, retry_failed=_RETRY.value,
                      plan_only=_PLAN_ONLY.value, submit=_SUBMIT.value, fit_only=_FIT_ONLY.value,
                      config_path=_config_path(), passthrough=_passthrough())
  _exit_if_failed(summary)


if __name__ == '__main__':
  from launch import errors
  _define_flags()
  errors.run(main)

"""Evaluation runs end to end: tasks -> results JSON + metrics, lm-eval runs, judge checks.

Shared by `launch.eval` (a workdir's checkpoint) and the trainer (`train.eval_tasks`, the live
parameters every `train.eval_every` steps).
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Sequence

from train import paths
from train.evaluation import harness


def results_path(workdir: str, specs, step: int | None) -> str:
  names = '+'.join(re.sub(r'[^\w.-]', '_', harness.spec_name(t, s)) for t, s in specs)
  if len(names) > 80:
    names = f'{len(specs)}tasks'
  return paths.join(workdir, 'eval', f'{names}-step{step if step is not None else "na"}.json')


def evaluate_and_save(model, specs, workdir: str, step: int | None, limit: int | None,
                      path: str, log: Callable[[str], None]) -> dict:
  """harness.evaluate, tagged with where and when, written to `path`."""
  results = harness.evaluate(model, specs, limit=limit, log=log)
  results.update(workdir=workdir, step=step, limit=limit)
  save_results(results, path)
  return results


def save_results(results: dict, path: str) -> None:
  """Written whole (temporary name, then rename): a reader never sees half a file."""
  paths.makedirs(os.path.dirname(path))
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  os.replace(tmp, path)


def run_and_save(model, specs, workdir: str, *, step: int | None = None,
                 limit: int | None = None, out: str | None = None, write_metrics: bool = True,
                 log: Callable[[str], None] = print) -> str:
  """Evaluates `specs`, saves every record to `out` (default WORKDIR/eval/...) and, with
  `write_metrics`, the means to WORKDIR/metrics.jsonl + TensorBoard at `step`."""
  if step is None:
    step = checkpoint_step(workdir)
  path = out or results_path(workdir, specs, step)
  results = evaluate_and_save(model, specs, workdir, step, limit, path, log)
  log(harness.summary_table(results))
  if write_metrics and step is not None:
    from train.metrics import MetricsWriter
    writer = MetricsWriter(workdir)
    writer.write(step, harness.flat_metrics(results))
    writer.close()
  return path


class PeriodicEval:
  """`train.eval_tasks` at each of the trainer's evaluations: the live parameters behind one
  engine built at the first call (later calls swap parameters, no recompiles)."""

  def __init__(self, specs: str, workdir: str, graphdef, model_cfg, tokenizer,
               limit: int = 0, serve_overrides: dict | None = None, prefix_ids=()):
    from train.evaluation import task as task_lib
    self.specs = task_lib.parse_specs(specs)
    self.workdir, self.graphdef, self.model_cfg, self.tokenizer = (workdir, graphdef, model_cfg,
                                                                   tokenizer)
    self.limit, self.overrides, self.model = limit or None, serve_overrides, None
    self.prefix_ids = list(prefix_ids)

  def __call__(self, params, step: int, log: Callable[[str], None] = print) -> dict:
    """Runs the tasks on `params`; saves WORKDIR/eval/...-step<step>.json; -> flat means."""
    from train.evaluation.lm import PalmaxModel
    if self.model is None:
      self.model = PalmaxModel.from_params(self.graphdef, params, self.model_cfg, self.tokenizer,
                                           self.overrides, name=self.workdir,
                                           prefix_ids=self.prefix_ids)
    else:
      self.model.set_params(params)
    results = evaluate_and_save(self.model, self.specs, self.workdir, step, self.limit,
                                results_path(self.workdir, self.specs, step), log)
    return harness.flat_metrics(results)

  def close(self) -> None:
    if self.model is not None:
      self.model.close()


def checkpoint_step(workdir: str, step: int | None = None) -> int | None:
  from train.checkpoint_stream import LeafReader
  try:
    return LeafReader(workdir, step, verify=False).step
  except (OSError, ValueError):
    return step


def lm_eval_tasks(tasks: Sequence[str], include_path: str | None = None):
  """lm-evaluation-harness's TaskManager after checking every name (before any model loads)."""
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  missing = [t for t in tasks if t not in manager.all_tasks]
  if missing:
    raise ValueError(f'--lm_eval_tasks: unknown task(s) {missing}' +
                     ('' if include_path else ' (a local task needs --lm_eval_include=DIR)'))
  return manager


def run_lm_eval(model, tasks: Sequence[str], manager, limit: int | None = None) -> str:
  """Runs lm-evaluation-harness tasks on `model` (palmax's EvalModel behind lm_eval's LM);
  returns lm_eval's results table."""
  import lm_eval
  from lm_eval.utils import make_table
  from train.evaluation.lm_eval_adapter import PalmaxLM
  out = lm_eval.simple_evaluate(model=PalmaxLM(model), tasks=list(tasks), task_manager=manager,
                                limit=limit, log_samples=False)
  return make_table(out)


def meta_evaluate_judge(model, limit: int | None = None, rubric: str = 'correctness',
                        rationale_tokens: int = 0) -> str:
  """The judge's agreement with reference labels (kappa, Spearman) and its position bias, on
  `limit` (default 100) arithmetic questions with known answers."""
  from train.evaluation import autorater, calibration
  if rubric not in autorater.RUBRICS:
    raise ValueError(f'rubric must be one of {sorted(autorater.RUBRICS)}, got {rubric!r}')
  labelled = calibration.reference_labelled_set(n=limit or 100)
  judge = autorater.Judge(model, autorater.RUBRICS[rubric], rationale_tokens=rationale_tokens)
  return calibration.format_report(calibration.meta_evaluate(judge, labelled))

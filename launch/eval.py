"""Evaluate a workdir (trained, or imported with launch.convert --from=hf) on tasks.

  python -m launch.eval --workdir=runs/tiny --tasks=arithmetic,arithmetic:3shot:cot,stdlib_mc
  python -m launch.eval --workdir=runs/tiny --tasks=my_task --task_files=my_task.py
  python -m launch.eval --workdir=runs/tiny --lm_eval_tasks=my_yaml_task --lm_eval_include=tasks/
  python -m launch.eval --workdir=runs/judge --autorater=reference     # judge meta-evaluation

Task specs are `name[:Kshot][:cot]`; `--list_tasks` prints the registered ones. Results (summary
with 95% bootstrap intervals, every example's prompt, response and scores) go to
WORKDIR/eval/<tasks>-step<N>.json (or --out), the means to WORKDIR/metrics.jsonl and TensorBoard
as eval/<spec>/<metric> at the checkpoint's step.
"""
from __future__ import annotations

from absl import flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'A palmax workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_TASKS = flags.DEFINE_list('tasks', [], 'Task specs: name[:Kshot][:cot], comma-separated.')
_TASK_FILES = flags.DEFINE_list('task_files', [], 'Python files that register more tasks.')
_LIMIT = flags.DEFINE_integer('limit', None, 'At most this many test examples per task.')
_OUT = flags.DEFINE_string('out', None, 'Results JSON (default: WORKDIR/eval/...).')
_NUM_SLOTS = flags.DEFINE_integer('num_slots', None, "Engine slots (default: the workdir's serve).")
_CONFIG_MESH = flags.DEFINE_bool('config_mesh', False,
                                 "Shard the model by the workdir config's mesh over every device "
                                 '(default: one device).')
_LIST = flags.DEFINE_bool('list_tasks', False, 'Print the registered tasks and exit.')
_LM_EVAL = flags.DEFINE_list('lm_eval_tasks', [], 'Run these lm-evaluation-harness tasks.')
_LM_EVAL_INCLUDE = flags.DEFINE_string('lm_eval_include', None,
                                       'A directory of lm_eval task YAML files.')
_AUTORATER = flags.DEFINE_enum('autorater', None, ['reference'],
                               'Meta-evaluate WORKDIR as a judge on a labelled set.')
_RUBRIC = flags.DEFINE_string('rubric', 'correctness', 'The judge\'s rubric (--autorater).')
_WRITE_METRICS = flags.DEFINE_bool('write_metrics', True,
                                   'Append the means to WORKDIR/metrics.jsonl and TensorBoard.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from train.evaluation import task as task_lib
  for path in _TASK_FILES.value:
    task_lib.load_task_file(path)
  if _LIST.value:
    task_lib.get('arithmetic')   # Loads the bundled ones.
    for name, t in sorted(task_lib.TASKS.items()):
      print(f'{name:20s} {t.kind:16s} {", ".join(t.metrics) or "pass@" + str(t.ks)}  {t.notes}')
    return
  if not _WORKDIR.value:
    raise ValueError('--workdir is required (a palmax workdir to evaluate)')
  if not (_TASKS.value or _LM_EVAL.value or _AUTORATER.value):
    raise ValueError('nothing to do: give --tasks, --lm_eval_tasks or --autorater')
  specs = task_lib.parse_specs(_TASKS.value) if _TASKS.value else []   # Before loading.
  if _LIMIT.value is not None and _LIMIT.value < 1:
    raise ValueError(f'--limit must be >= 1, got {_LIMIT.value}')
  from train.evaluation import runner
  manager = runner.lm_eval_tasks(_LM_EVAL.value, _LM_EVAL_INCLUDE.value) if _LM_EVAL.value else None
  from train.evaluation.lm import PalmaxModel
  overrides = {'num_slots': _NUM_SLOTS.value} if _NUM_SLOTS.value else None
  model = PalmaxModel.load(_WORKDIR.value, _STEP.value, overrides, _CONFIG_MESH.value)
  try:
    if specs:
      path = runner.run_and_save(model, specs, _WORKDIR.value, limit=_LIMIT.value,
                                 step=runner.checkpoint_step(_WORKDIR.value, _STEP.value),
                                 out=_OUT.value, write_metrics=_WRITE_METRICS.value, log=print)
      print(f'results: {path}')
    if _LM_EVAL.value:
      print(runner.run_lm_eval(model, _LM_EVAL.value, manager, _LIMIT.value))
    if _AUTORATER.value:
      print(runner.meta_evaluate_judge(model, limit=_LIMIT.value, rubric=_RUBRIC.value))
  finally:
    model.close()


if __name__ == '__main__':
  from launch import errors
  errors.run(main)

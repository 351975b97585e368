"""Human side-by-side rating of two evaluation runs, and the judge checked against the raters.

  # Pages for raters: example by example, run A's response beside run B's.
  python -m launch.side_by_side --mode=export --a=runs/a/eval/X.json --b=runs/b/eval/X.json \
      --task=stdlib_docstring:3shot --out=sxs/
  # ... raters open sxs/pairs.html, pick A / B / tie, download labels.jsonl ...
  python -m launch.side_by_side --mode=score --pairs=sxs/pairs.jsonl --labels=labels.jsonl \
      [--judge=runs/judge]

`score` prints A's win rate (ties count half) with a 95% interval and, with --judge, the judge's
agreement and Cohen's kappa with the raters and its position-bias rate.
"""
from __future__ import annotations

import json
import os

from absl import flags, logging

_MODE = flags.DEFINE_enum('mode', None, ['export', 'score'], 'export pages or score labels.')
_A = flags.DEFINE_string('a', None, 'export: the first launch.eval results JSON.')
_B = flags.DEFINE_string('b', None, 'export: the second launch.eval results JSON.')
_TASK = flags.DEFINE_string('task', None, 'export: the task spec to compare (a generation task).')
_OUT = flags.DEFINE_string('out', None, 'export: a directory for pairs.jsonl and pairs.html.')
_PAIRS = flags.DEFINE_string('pairs', None, 'score: the pairs.jsonl written by export.')
_LABELS = flags.DEFINE_string('labels', None, "score: the raters' labels (JSONL or CSV).")
_JUDGE = flags.DEFINE_string('judge', None, 'score: a workdir to meta-evaluate as a judge.')
_RUBRIC = flags.DEFINE_string('rubric', 'helpfulness', "score: the judge's rubric.")


def _need(flag, mode):
  if not flag.value:
    raise ValueError(f'--mode={mode} needs --{flag.name}')
  return flag.value


def _read_json(path: str, flag: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(f'--{flag}: {path} not found') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'--{flag}: {path} is not JSON ({e.msg}, line {e.lineno})') from None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from train.evaluation import side_by_side as sxs
  if _MODE.value is None:
    raise ValueError('--mode is required: export or score')
  if _MODE.value == 'export':
    a, b = _read_json(_need(_A, 'export'), 'a'), _read_json(_need(_B, 'export'), 'b')
    items = sxs.pairs_from_results(a, b, _need(_TASK, 'export'))
    out = _need(_OUT, 'export')
    os.makedirs(out, exist_ok=True)
    sxs.export_jsonl(os.path.join(out, 'pairs.jsonl'), items)
    sxs.export_html(os.path.join(out, 'pairs.html'), items,
                    title=f'{_TASK.value}: {os.path.basename(_A.value)} vs '
                          f'{os.path.basename(_B.value)}')
    print(f'{len(items)} pairs: {out}/pairs.html (for raters), {out}/pairs.jsonl')
    return
  from train import paths
  pairs_path = _need(_PAIRS, 'score')
  items = [obj for obj, _ in paths.read_jsonl(pairs_path, '--pairs')]
  labels = sxs.import_labels(_need(_LABELS, 'score'), items)
  w = sxs.win_rate(labels)
  print(f'A preferred {w["mean"]:.3f} [{w["ci_low"]:.3f}, {w["ci_high"]:.3f}] over {w["n"]} '
        f'pairs (a {labels.count("a")}, b {labels.count("b")}, tie {labels.count("tie")})')
  if _JUDGE.value:
    from train.evaluation import autorater, calibration
    from train.evaluation.lm import PalmaxModel
    if _RUBRIC.value not in autorater.RUBRICS:
      raise ValueError(f'--rubric must be one of {sorted(autorater.RUBRICS)}')
    model = PalmaxModel.load(_JUDGE.value)
    try:
      judge = autorater.Judge(model, autorater.RUBRICS[_RUBRIC.value], rationale_tokens=0)
      labelled = [dict(item, label=label) for item, label in zip(items, labels)]
      print(calibration.format_report(calibration.meta_evaluate(judge, labelled)))
    finally:
      model.close()


if __name__ == '__main__':
  from launch import errors
  errors.run(main)

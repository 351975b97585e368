"""What a resumed run must agree on with its checkpoint, and what it carries over.

A checkpoint's JSON record holds the model config, the data config, the corpus fingerprint, the
tokenizer digest and the learning-rate schedule's length. A run resuming from it must have the
same model and data (refused in one line naming the first field that differs, before anything in
the workdir is written) and keeps the schedule it started with unless told otherwise.
"""
from __future__ import annotations

import json
from typing import Any

from train import paths
from train.checkpoint import CheckpointMismatchError


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f'{prefix}.{k}'))
  return out


def _json_value(v: Any) -> Any:
  """As the value reads back from JSON (tuples become lists), so saved and live values compare."""
  return json.loads(json.dumps(v))


def recorded_config(record: dict) -> dict:
  """The full config a checkpoint was written with (empty if the record predates it)."""
  try:
    return json.loads(record.get('config') or '{}')
  except (TypeError, ValueError):
    return {}


def check_same_data(cfg, record: dict, where: str) -> None:
  """Refuses a data section that differs from the one `record`'s run trained with, naming the
  field and both values: a different stream would silently break exact resumption."""
  then = record.get('data_config') or recorded_config(record).get('data')
  if not then:
    return   # A record from before data configs were recorded: the corpus check still runs.
  have = _flatten(_json_value(then), 'config.data')
  want = _flatten(_json_value(cfg.data.to_dict()), 'config.data')
  for key in sorted(set(have) | set(want)):
    if key not in have:
      continue   # A field added to palmax after this checkpoint was written.
    if have.get(key) != want.get(key):
      raise CheckpointMismatchError(
          f'{where} was trained with {key}={have.get(key)!r}, but this run has '
          f'{key}={want.get(key)!r}; resume with the original value or use a new --workdir')


def schedule_steps(cfg, record: dict | None, log=print) -> int:
  """Length of the learning-rate schedule: `train.schedule_steps` when set; else, when resuming,
  the length the run started with (a changed `train.steps` does not stretch a cosine that is
  half-way down); else `train.steps`."""
  t = cfg.train
  explicit = int(t.get('schedule_steps', 0) or 0)
  if explicit:
    return explicit
  if record is None:
    return int(t.steps)
  then = record.get('schedule_steps') or recorded_config(record).get('train', {}).get('steps')
  then = int(then or t.steps)
  if then != t.steps:
    after = ('then holds its final value' if t.steps > then else 'is cut off early')
    log(f'config.train.steps changed from {then} to {t.steps}: the learning-rate schedule keeps '
        f'its original length of {then} steps and {after}; set config.train.schedule_steps='
        f'{t.steps} to stretch it instead')
  return then


def trim_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl rows after `step`: a resumed run redoes those steps and logs them anew,
  so the file keeps one row per step, as an uninterrupted run writes it."""
  path = paths.join(workdir, 'metrics.jsonl')
  if not paths.exists(path):
    return
  lines = paths.read_text(path).splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)['step']) > step:
        continue
    except (ValueError, KeyError, TypeError):
      continue   # A line cut short by a kill mid-write.
    keep.append(line)
  if keep != lines:
    paths.write_text(path, ''.join(keep))

"""Orbax checkpoints: asynchronous, atomic, keep-last-k, refused when they do not fit the config.

A checkpoint holds the train state pytree (params, opt_state, step, rng) and a JSON record
(data position, model config, corpus fingerprint, tokenizer). Orbax writes each step into a
temporary directory and renames it when complete, so a half-written step is never listed.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir was made by a different model or data setup."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train state plus a JSON record."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict, force: bool = False) -> bool:
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      record=ocp.args.JsonSave(record)), force=force)

  def read_record(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    out = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(out['record'])

  def restore(self, abstract_state: Any, step: int | None = None,
              expect: dict | None = None) -> tuple[Any, dict]:
    """Restores onto `abstract_state` (ShapeDtypeStructs carrying shardings).

    `expect` maps record keys to the values this run needs (e.g. the model config); any
    difference raises CheckpointMismatchError naming the field, before tensors are read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    record = self.read_record(step)
    for key, want in (expect or {}).items():
      _compare(key, record.get(key), want, self.directory, step)
    out = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      record=ocp.args.JsonRestore()))
    return out['state'], dict(out['record'])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _compare(key: str, have: Any, want: Any, directory: str, step: int) -> None:
  if isinstance(want, dict) and isinstance(have, dict):
    for k in sorted(set(have) | set(want)):
      if have.get(k) != want.get(k):
        raise CheckpointMismatchError(
            f'checkpoint {directory} (step {step}) was made with {key}.{k}={have.get(k)!r}, but this '
            f'run has {key}.{k}={want.get(k)!r}; use a new --workdir or the original config')
  elif have != want:
    raise CheckpointMismatchError(
        f'checkpoint {directory} (step {step}) has {key}={have!r}, but this run has {want!r}; '
        f'use a new --workdir or the original config')

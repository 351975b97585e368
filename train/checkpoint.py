"""Orbax checkpoints: asynchronous, atomic, keep-last-k, verified, refused when they do not fit.

A checkpoint holds the train state pytree (params, opt_state, step, rng) and a JSON record
(data position, model config, corpus fingerprint, tokenizer). Orbax writes each step into a
temporary directory and renames it when complete, so a half-written step is never listed.
Every step also carries `palmax_manifest.json` (sizes and sha256 of its files, see
`checkpoint_verify`), written by orbax's post-finalisation hook: after the step's items are
finalised and before the directory is renamed, so a listed step has its manifest from the start.
`restore` checks it and never restores bytes that changed after the save: it falls back to the
newest step that verifies (or stops), and moves corrupt steps to `WORKDIR/checkpoints_corrupt/`.
"""
from __future__ import annotations


from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from model.config import HOW_NOT_WHAT
from train import paths
from train.checkpoint_verify import (MANIFEST, CheckpointCorruptError, move_corrupt,  # noqa: F401
                                     newest_verified, quiet_reads, read_error,
                                     verify_step, write_manifest)

_TMP_SUFFIX = '.orbax-checkpoint-tmp'   # orbax's name for a step being written: '<step>' + this.


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir was made by a different model or data setup."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train state plus a JSON record."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               log: Callable[[str], None] = print):
    self.directory = paths.join(paths.absolute(workdir), 'checkpoints')
    self._async, self._log = async_save, log
    self._saving: int | None = None   # The step whose manifest the hook writes.
    # orbax accepts the hook only with its AsyncCheckpointer; synchronous saves write the
    # manifest in `save` once the step is committed.
    async_options = (ocp.AsyncOptions(post_finalization_callback=self._on_finalized)
                     if async_save else None)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             async_options=async_options))

  def latest_step(self) -> int | None:
    """The newest committed step, verified or not (None without checkpoints)."""
    return self._manager.latest_step()

  def latest_verified_step(self) -> int | None:
    """The newest step whose files match its manifest ("the last good checkpoint"); unverified
    and corrupt steps are passed over. Waits for a save in flight; hashes whole steps."""
    self._manager.wait_until_finished()
    return newest_verified(self.directory, list(self._manager.all_steps()))

  def verify(self, step: int) -> bool:
    """True when step `step` matches its manifest, False when it has none (unverified); raises
    CheckpointCorruptError (one line naming step and file) when it does not match."""
    return verify_step(self.directory, step)

  def save(self, step: int, state: Any, record: dict, force: bool = False) -> bool:
    if not force and not self._manager.should_save(step):
      return False
    # orbax's save waits for the previous one anyway; waiting here first means the hook of that
    # previous save has run before `_saving` names the new step.
    self._manager.wait_until_finished()
    if step in self._manager.all_steps() and not paths.isdir(paths.join(self.directory, str(step))):
      self._manager.reload()   # Process 0 moved it away as corrupt (other processes still list it).
    self._saving = step
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      record=ocp.args.JsonSave(record)), force=force)
    if saved and not self._async:   # Committed already: a kill before this leaves it unverified.
      self._write_manifest(step, paths.join(self.directory, str(step)))
    return saved

  def _on_finalized(self) -> None:
    """orbax's `post_finalization_callback`: runs in its background thread on the primary host
    once every item of the step is finalised, before `<step>.orbax-checkpoint-tmp` is renamed
    to `<step>` (orbax then adds only the two top-level files the manifest leaves unhashed)."""
    step = self._saving
    if step is None:
      return
    tmp = paths.join(self.directory, f'{step}{_TMP_SUFFIX}')
    # Storage that commits in place (a commit file, no rename) writes straight into '<step>'.
    self._write_manifest(step, tmp if paths.isdir(tmp) else
                         paths.join(self.directory, str(step)))

  def _write_manifest(self, step: int, step_dir: str) -> None:
    if jax.process_index() != 0:
      return
    try:
      write_manifest(step_dir, step)
    except Exception as e:  # pylint: disable=broad-except
      # Failing here would make orbax drop a complete checkpoint; unverified beats lost.
      self._log(f'warning: could not write {MANIFEST} for checkpoint step {step} in '
                f'{self.directory} ({type(e).__name__}: {e}); the step stays unverified')

  def read_record(self, step: int | None = None) -> dict:
    """The JSON record of `step` (default the latest), without verifying the step."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    out = _read(self._manager, self.directory, step,
                ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(out['record'])

  def restore(self, abstract_state: Any, step: int | None = None, expect: dict | None = None,
              *, on_corrupt: str = 'previous', verify: bool = True,
              log: Callable[[str], None] = print) -> tuple[Any, dict]:
    """(state, record) of the newest step (or of `step`), restored onto `abstract_state`
    (ShapeDtypeStructs carrying shardings).

    `expect` maps record keys to the values this run needs (e.g. the model config); any
    difference raises CheckpointMismatchError naming the field, before tensors are read.
    The step is checked against its manifest first (record files, then `expect`, then all
    files). A corrupt step (or one without a manifest that orbax cannot read) is handled by
    `on_corrupt`: 'stop' raises CheckpointCorruptError and changes nothing on disk; 'previous'
    moves it to WORKDIR/checkpoints_corrupt/ (process 0), logs one line and tries the next older
    step, raising CheckpointCorruptError when none restores. A step without a manifest is
    restored unverified (with a log line). Any read error becomes a one-line
    CheckpointCorruptError naming the step. `verify=False` skips hashing, which reads every
    byte of the step once more: meant for huge checkpoints on storage that is trusted.
    """
    if on_corrupt not in ('previous', 'stop'):
      raise ValueError(f"on_corrupt={on_corrupt!r}: use 'previous' or 'stop'")
    steps = sorted(self._manager.all_steps())
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    if step is not None and step not in steps:
      raise FileNotFoundError(f'no checkpoint step {step} in {self.directory} (have {steps})')
    candidates = [s for s in reversed(steps) if step is None or s <= step]
    skipped: list[tuple[int, str, str]] = []
    for s in candidates:
      try:
        state, record, verified = self._restore_step(abstract_state, s, expect, verify)
      except CheckpointCorruptError as e:
        if on_corrupt == 'stop' or e.verified:
          raise
        skipped.append((s, _reason(e), self._move(s)))
        continue
      good = ('the newest that verifies' if verified else
              f'the newest that loads ({"no manifest" if verify else "verify=False"})')
      for bad, why, dest in skipped:
        log(f'checkpoint step {bad} is corrupt ({why}): falling back to step {s}, {good}; '
            f'step {bad} moved to {dest}')
      if verify and not verified:
        log(f'checkpoint step {s} in {self.directory} has no {MANIFEST} (saved before '
            'checkpoints were verified, or killed before its manifest was written): restored '
            'it unverified')
      return state, record
    dests = sorted({paths.dirname(d) for _, _, d in skipped})
    raise CheckpointCorruptError(
        f'no checkpoint in {self.directory} can be restored: '
        + '; '.join(f'step {s}: {why}' for s, why, _ in skipped)
        + f'; moved to {", ".join(dests)} for inspection', candidates[0], self.directory)

  def _restore_step(self, abstract_state: Any, step: int, expect: dict | None,
                    verify: bool) -> tuple[Any, dict, bool]:
    if not paths.isdir(paths.join(self.directory, str(step))):
      raise CheckpointCorruptError(   # Moved away meanwhile (by process 0 of this job?).
          f'checkpoint step {step} in {self.directory} is corrupt: its directory is gone',
          step, self.directory)
    if verify:
      verify_step(self.directory, step, prefix='record/')   # Cheap: the record only.
    record = self.read_record(step)
    for key, want in (expect or {}).items():
      _compare(key, record.get(key), want, self.directory, step)
    verified = verify_step(self.directory, step) if verify else False
    out = _read(self._manager, self.directory, step, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
    return out['state'], dict(out['record']), verified

  def _move(self, step: int) -> str:
    dest_root = paths.join(paths.dirname(self.directory), 'checkpoints_corrupt')
    if jax.process_index() != 0 or not paths.isdir(paths.join(self.directory, str(step))):
      return paths.join(dest_root, str(step))
    dest = move_corrupt(self.directory, step)
    self._manager.reload()   # Forget the step, so it can be saved again and is never deleted.
    return dest

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _read(manager: ocp.CheckpointManager, directory: str, step: int, args) -> Any:
  """manager.restore, with any read failure turned into one line (see `read_error`)."""
  try:
    with quiet_reads():
      return manager.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except
    err = read_error(directory, step, e)
    if err is e:
      raise
    raise err from e   # One line at the CLI boundary; PALMAX_TRACEBACK=1 shows orbax's.


def _reason(e: CheckpointCorruptError) -> str:
  text = str(e)
  return text.split(' is corrupt: ', 1)[1] if ' is corrupt: ' in text else text




def _compare(key: str, have: Any, want: Any, directory: str, step: int) -> None:
  if isinstance(want, dict) and isinstance(have, dict):
    for k in sorted(set(have) | set(want)):
      if k not in have or k in HOW_NOT_WHAT:
        continue   # A field added to palmax after the checkpoint was written, or how-not-what.
      if have.get(k) != want.get(k):
        raise CheckpointMismatchError(
            f'checkpoint {directory} (step {step}) was made with {key}.{k}={have.get(k)!r}, but this '
            f'run has {key}.{k}={want.get(k)!r}; use a new --workdir or the original config')
  elif have != want:
    raise CheckpointMismatchError(
        f'checkpoint {directory} (step {step}) has {key}={have!r}, but this run has {want!r}; '
        f'use a new --workdir or the original config')

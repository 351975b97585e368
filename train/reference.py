"""The frozen reference of DPO and RL objectives, and starting from a base without this run's
scalar heads.

A full-weight run whose objective needs a reference (`Objective.wants_reference`) keeps a second,
never-updated copy of `train.init_from`'s parameters on the parameters' shardings, passed to the
jitted step beside the state (train/step.py). It is not checkpointed: the record names it
(workdir, step and the sha256 digest of that step's manifest, as adapter-only runs name their
base), and a resume reloads it and refuses a base whose digest changed. A PEFT run needs no copy:
its reference is the same weights with the adapters switched off.
"""
from __future__ import annotations

from typing import Any

from train import checkpoint_stream, paths

RECORD_KEY = 'reference'   # {'workdir', 'step', 'digest'} of a full-weight run's reference.


def new_heads(workdir: str, abstract_params: dict) -> list[str]:
  """Top-level `<name>_head` parameters of this run that `workdir`'s model does not have (a
  reward model started from an SFT model): they start fresh."""
  record = checkpoint_stream.read_record(workdir)
  have = set((record.get('model') or {}).get('heads') or ())
  return [k for k in abstract_params if k.endswith('_head') and k[:-len('_head')] not in have]


def init_params(workdir: str, model_cfg, abstract_params: dict, fresh_params: dict
                ) -> tuple[Any, int]:
  """(params, step) of `workdir`'s latest checkpoint, as `checkpoint_stream.init_params`, with
  the heads it lacks taken from `fresh_params` (this run's initialisation)."""
  skip = new_heads(workdir, abstract_params)
  params, step = checkpoint_stream.init_params(
      workdir, model_cfg, {k: v for k, v in abstract_params.items() if k not in skip})
  return dict(params, **{k: fresh_params[k] for k in skip}), step


def check(entry: dict, where: str) -> None:
  """One-line CheckpointMismatchError if the reference a record names is gone or changed."""
  from train import peft_run
  from train.checkpoint import CheckpointMismatchError
  step_dir = paths.join(entry['workdir'], 'checkpoints', str(entry['step']))
  if not paths.isdir(step_dir):
    raise CheckpointMismatchError(
        f"{where} was trained against the reference {entry['workdir']} step {entry['step']}, "
        'which is gone; restore that checkpoint to resume')
  digest = peft_run.base_digest(entry['workdir'], entry['step'])
  if digest != entry['digest']:
    raise CheckpointMismatchError(
        f"{where} was trained against {entry['workdir']} step {entry['step']} with digest "
        f"{entry['digest'][:12]}, but that checkpoint now has digest {digest[:12]}: not the same "
        'reference weights')


def load(entry: dict, abstract_params: dict, where: str) -> Any:
  """The reference parameters a record's entry names, after `check`ing its digest and verifying
  the step against its manifest (a corrupt file is refused, not trained against). Heads the base
  lacks are zeros: a reference's heads are never read."""
  import jax
  import jax.numpy as jnp
  check(entry, where)
  skip = new_heads(entry['workdir'], abstract_params)
  params, _ = checkpoint_stream.restore_params(
      entry['workdir'], {k: v for k, v in abstract_params.items() if k not in skip},
      entry['step'], verify=True)
  zeros = {k: jax.jit(lambda a=abstract_params[k]: jnp.zeros(a.shape, a.dtype),
                      out_shardings=abstract_params[k].sharding)() for k in skip}
  return dict(params, **zeros)


def entry(workdir: str, step: int) -> dict:
  from train import peft_run
  return {'workdir': paths.absolute(workdir), 'step': int(step),
          'digest': peft_run.base_digest(workdir, step)}

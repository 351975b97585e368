"""PEFT runs: the frozen base comes from `train.init_from`; checkpoints hold only what trains.

A LoRA / adapter / soft-prompt run initialises from a base workdir (a pretraining run or a
converted HF checkpoint): its parameters are read in the base's own layout, the PEFT surgery is
applied to them (model/peft/methods.py: quantize for QLoRA, then add the adapters), and the
result is placed on the run's shardings. The base never changes, so a checkpoint saves only the
trainable parameters (kilobytes to megabytes, `saved_state`) and its record names the base:
workdir, step and `base_digest`, the sha256 of that step's manifest (every file's sha256).
Resuming, evaluating or serving the workdir rebuilds the frozen part from that base and refuses
one whose digest differs: adapters on another base are silent garbage.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
from flax import nnx

from model.config import ModelConfig
from model.peft import methods as peft_lib
from train import checkpoint_stream, checkpoint_verify as cv, paths, trainable

RECORD_KEY = 'peft'        # The run's config.peft.
BASE_KEY = 'peft_base'     # {'workdir', 'step', 'digest'} of an adapter-only run's base.


def config_of(cfg) -> peft_lib.PeftConfig:
  """`cfg.peft` as a PeftConfig (a config saved before PEFT existed has none: no PEFT)."""
  return peft_lib.PeftConfig.from_config(cfg.get('peft') if hasattr(cfg, 'get') else None)


def prefix_ids(cfg, model_cfg) -> list[int]:
  """The ids every sequence of the run's model starts with (a soft prompt's), or []."""
  return peft_lib.prefix_ids(config_of(cfg), model_cfg.vocab_size)


def adapter_only(cfg) -> bool:
  """Checkpoints hold only the trainable parameters: a PEFT method over an init_from base."""
  return bool(config_of(cfg).method and cfg.train.get('init_from'))


def base_digest(workdir: str, step: int) -> str:
  """sha256 over the base checkpoint step's manifest entries (path, size, sha256 of each file),
  or over the files themselves when the step has no manifest."""
  step_dir = paths.join(paths.absolute(workdir), 'checkpoints', str(step))
  manifest_path = paths.join(step_dir, cv.MANIFEST)
  if paths.exists(manifest_path):
    files = json.loads(paths.read_bytes(manifest_path))['files']
  else:
    files = _hash_files(step_dir)
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _hash_files(step_dir: str) -> dict:
  rels = cv._step_files(step_dir)   # pylint: disable=protected-access
  digests = cv._hash_all(step_dir, rels)   # pylint: disable=protected-access
  return {r: {'size': paths.size(paths.join(step_dir, r)), 'sha256': digests[r]} for r in rels}


def base_params(base: str, step: int | None, model_cfg: ModelConfig, peft: peft_lib.PeftConfig,
                param_shardings, rules, seed: int) -> tuple[Any, dict]:
  """(params in the run's PEFT layout on `param_shardings`, the base's record entry
  {'workdir', 'step', 'digest'}): the base's parameters (latest step, or `step`) with the
  surgery applied. Fresh adapters are initialised from `seed`."""
  from train import state as state_lib
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  # The base's own layout and shardings (no PEFT), by the run's rules.
  graphdef, abstract, shardings = state_lib.param_shardings(model_cfg, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  if step is None:
    params, step = checkpoint_stream.init_params(base, model_cfg, abstract)
  else:
    reader = checkpoint_stream.LeafReader(base, step)
    checkpoint_stream.check_model(reader.record, model_cfg, f'the PEFT base {base}',
                                  architecture_only=True)
    params, _ = checkpoint_stream.restore_params(base, abstract, step, verify=False)
  model = nnx.merge(graphdef, params)
  peft_lib.apply_peft(model, peft, seed)
  full = nnx.state(model).to_pure_dict()
  full = jax.tree.map(jax.device_put, full, param_shardings)
  return full, {'workdir': paths.absolute(base), 'step': int(step),
                'digest': base_digest(base, step)}


def describe(spec, model_cfg: ModelConfig, peft: peft_lib.PeftConfig) -> str:
  """'12,288 of 1,234,567 parameters (1.00%)' for the log; a quantized weight counts its
  elements, not its packed codes."""
  import dataclasses
  sizes = [(int(a.size), m) for a, m in zip(jax.tree.leaves(spec.abstract_params),
                                             jax.tree.leaves(spec.trainable_mask))]
  train = sum(n for n, m in sizes if m)
  unquantized = peft_lib.abstract_model(model_cfg, dataclasses.replace(peft, quant=''))
  total = sum(int(a.size) for a in jax.tree.leaves(nnx.state(unquantized)))
  return f'{train:,} of {total:,} parameters ({100 * train / max(total, 1):.2f}%)'


def saved_state(state: dict, mask) -> dict:
  """The state as an adapter-only checkpoint stores it: frozen parameters left out (None)."""
  return dict(state, params=trainable.split(state['params'], mask)[0])


def restore_full(saved: dict, frozen_params, mask) -> dict:
  """`saved_state`'s inverse, given the rebuilt full parameters (whose frozen part is used)."""
  return dict(saved, params=trainable.merge(saved['params'],
                                            trainable.split(frozen_params, mask)[1]))


def restore_adapter_only(workdir: str, cfg, model_cfg: ModelConfig, abstract, shardings, rules,
                         step: int | None) -> tuple[Any, dict]:
  """(full params, record) of an adapter-only workdir: its trainable parameters restored onto
  `abstract` (the PEFT layout), the frozen rest rebuilt from the recorded (and checked) base."""
  peft = config_of(cfg)
  mask = trainable.make_mask(abstract, peft_lib.trainable_pattern(
      peft, cfg.train.get('trainable', '')))
  saved, record = checkpoint_stream.restore_params(workdir, trainable.split(abstract, mask)[0],
                                                   step)
  base = check_base(record, f'{workdir} (step {record.get("data", {}).get("step", step)})')
  full, _ = base_params(base['workdir'], base['step'], model_cfg, peft, shardings, rules,
                        cfg.train.seed)
  return trainable.merge(saved, trainable.split(full, mask)[1]), record


def read_base(workdir: str, step: int | None = None) -> dict | None:
  """The base entry of `workdir`'s checkpoint record, or None (not adapter-only)."""
  return checkpoint_stream.read_record(workdir, step).get(BASE_KEY)


def check_base(record: dict, where: str) -> dict:
  """The base entry of an adapter-only checkpoint's record, after checking that the base still
  holds that step with the same digest (CheckpointMismatchError in one line otherwise)."""
  from train.checkpoint import CheckpointMismatchError
  base = record.get(BASE_KEY)
  if not base:
    raise CheckpointMismatchError(f'{where} is an adapter-only checkpoint without its base '
                                  'in the record')
  step_dir = paths.join(base['workdir'], 'checkpoints', str(base['step']))
  if not paths.isdir(step_dir):
    raise CheckpointMismatchError(
        f"{where} holds adapters for {base['workdir']} step {base['step']}, which is gone; "
        'restore that checkpoint (or keep more with train.keep_checkpoints in the base run)')
  digest = base_digest(base['workdir'], base['step'])
  if digest != base['digest']:
    raise CheckpointMismatchError(
        f"{where} holds adapters trained on {base['workdir']} step {base['step']} with digest "
        f"{base['digest'][:12]}, but that checkpoint now has digest {digest[:12]}: not the same "
        'base weights')
  return base

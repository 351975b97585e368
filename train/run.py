"""Building a training run: mesh, objective, state (fresh, resumed or initialised from another
workdir), data and the jitted steps, with the workdir treated as a transaction.

`build(cfg, workdir, log)` returns a `Run` that `train/trainer.py`'s loop drives. Everything that
can refuse the run (config values, mesh fit, a checkpoint that is corrupt or made by another
model or data) runs before the workdir is written; `Run.commit()` then writes config.json.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from model import pipeline, sharding
from model.config import ConfigError, ModelConfig
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import objectives, optim, paths, peft_run, resume, state as state_lib
from train import reference as reference_lib
from train import step as step_lib


def check_config(cfg, model_cfg: ModelConfig, mesh, rules=None, pipe=None) -> None:
  """The checks that need the mesh, each naming the field (the rest is train/config_schema.py)."""
  t = cfg.train
  n_batch_shards = sharding.batch_shards(mesh, rules or sharding.check_rules(cfg.mesh.rules))
  if model_cfg.moe is not None and model_cfg.moe.num_experts % mesh.shape['expert']:
    raise ConfigError(f'config.model.moe.num_experts={model_cfg.moe.num_experts} is not divisible '
                      f'by the mesh expert axis size {mesh.shape["expert"]}')
  if pipe is not None:
    pipe.check_fits(model_cfg.layer_groups(), t.batch_size // max(t.grad_accum, 1), n_batch_shards)
  if (t.batch_size // t.grad_accum) % n_batch_shards:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} (per microbatch {t.batch_size // t.grad_accum}) '
        f'is not divisible by the {n_batch_shards} batch shards of the mesh {dict(mesh.shape)}')


def rows_sharding(batch_sh: NamedSharding, ndim: int) -> NamedSharding:
  """The batch sharding ([B, T] arrays) for an array of `ndim` dimensions with rows first (a
  per-row scalar [B], e.g. a reward model's target score)."""
  spec = tuple(batch_sh.spec) + (None,) * max(0, ndim - len(batch_sh.spec))
  return NamedSharding(batch_sh.mesh, P(*spec[:ndim]))


@dataclasses.dataclass
class Run:
  """Everything the loop needs; `state` is the train state at `step`."""
  cfg: Any
  workdir: str
  model_cfg: ModelConfig
  mesh: Any
  rules: Any
  pipe: pipeline.PipelineConfig
  objective: objectives.Objective
  spec: state_lib.StateSpec
  ckpt: ckpt_lib.Checkpointer
  data: data_lib.DataBundle
  state: dict
  schedule_steps: int
  train_step: Callable       # (state, batch) -> (state, metrics), jitted
  eval_step: Callable        # (params, batch) -> eval sums, jitted
  batch_sharding: NamedSharding
  resumed: bool
  peft_base: dict | None = None   # An adapter-only run's base: {'workdir', 'step', 'digest'}.
  reference: dict | None = None   # A full-weight reference's {'workdir', 'step', 'digest'}.
  policy: Any = None              # RL: the policy sampling each step's batch (train/rl/).

  def next_batch(self, state: dict, log=print) -> dict:
    """The next training batch as sharded global arrays: the data's next rows, or (RL) rows
    the policy samples now with `state`'s parameters."""
    if self.policy is None:
      return self.batch(next(self.data.train), global_rows=self.cfg.train.batch_size)
    self.policy.set_params(state['params'])
    return self.batch(self.data.train.next_rows(self.policy, log))

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state['step']))

  def batch(self, tokens_BW: np.ndarray | dict, loss_mask_BT: np.ndarray | None = None,
            global_rows: int | None = None) -> dict:
    """The objective's fields for these windows, as global arrays sharded over the batch axes.
    `global_rows` given: `tokens_BW` holds this process's rows of that many; else all rows.
    A dict (SFT's packed rows) already holds every field."""
    if isinstance(tokens_BW, dict):
      fields = {k: tokens_BW[k] for k in self.objective.batch_fields()}
      tokens_BW = tokens_BW['tokens']
    else:
      fields = data_lib.batch_fields(tokens_BW, self.objective.batch_fields(),
                                     self.data.tokenizer.eos_id, loss_mask_BT)
    if global_rows is None:
      return {k: jax.make_array_from_callback(v.shape, rows_sharding(self.batch_sharding, v.ndim),
                                              lambda i, v=v: v[i])
              for k, v in fields.items()}
    return {k: jax.make_array_from_process_local_data(rows_sharding(self.batch_sharding, v.ndim),
                                                      v, (global_rows,) + v.shape[1:])
            for k, v in fields.items()}

  def record(self) -> dict:
    """The JSON record saved with each checkpoint (what a resume must agree with)."""
    out = {'data': self.data.train.state(), 'model': self.model_cfg.to_dict(),
           'data_config': self.cfg.data.to_dict(), 'schedule_steps': self.schedule_steps,
           'corpus_fingerprint': self.data.info['fingerprint'], 'corpus': self.data.info,
           'config': self.cfg.to_json_best_effort()}
    peft = peft_run.config_of(self.cfg)
    if peft.active:
      out[peft_run.RECORD_KEY] = dataclasses.asdict(peft)
    if self.peft_base is not None:
      out[peft_run.BASE_KEY] = self.peft_base
    if self.reference is not None:
      out[reference_lib.RECORD_KEY] = self.reference
    return out

  def saved(self, state: dict) -> dict:
    """What a checkpoint stores of `state`: all of it, or only what trains (adapter-only)."""
    if self.peft_base is None:
      return state
    return peft_run.saved_state(state, self.spec.trainable_mask)

  def commit(self) -> None:
    """The run fits the workdir: write its config (what sampling reads) and drop metrics rows of
    steps that will be redone."""
    if jax.process_index() == 0:
      paths.write_text(paths.join(self.workdir, 'config.json'), self.cfg.to_json(indent=2))
      resume.trim_metrics(self.workdir, self.step)


def build(cfg, workdir: str, log=print) -> Run:
  """A Run for `cfg` in `workdir` (validated and locked by the caller)."""
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  mesh, rules = sharding.mesh_from_config(cfg.mesh)
  pipe = pipeline.PipelineConfig.from_config(cfg.get('pipeline'), mesh.shape['pipeline'])
  check_config(cfg, model_cfg, mesh, rules, pipe)
  t = cfg.train
  objective = objectives.get(t.objective)(cfg)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(('batch', None), rules,
                                                          (t.batch_size, 1), mesh))
  tx, _ = optim.make_optimizer(t, t.steps, model_cfg)  # The state structure; schedule below.
  peft = peft_run.config_of(cfg)
  spec = state_lib.make_state_spec(model_cfg, tx, mesh, rules, t.get('trainable', ''), peft)
  adapter_only = peft_run.adapter_only(cfg)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoints,
                               log=log)
  record, where, peft_base = None, '', None
  ref_params, ref_entry = None, None   # A full-weight run's frozen reference (DPO, RL).
  try:
    if ckpt.latest_step() is not None:
      expect = {'model': model_cfg.to_dict()}
      if peft.active:
        expect[peft_run.RECORD_KEY] = dataclasses.asdict(peft)
      target = spec.abstract_state
      if adapter_only:   # Only the trainable parameters are stored; the base is rebuilt.
        target = peft_run.saved_state(spec.abstract_state, spec.trainable_mask)
      state, record = ckpt.restore(target, expect=expect, on_corrupt=t.on_corrupt,
                                   verify=t.verify_checkpoints, log=log)
      where = f'checkpoint step {int(state["step"])} in {ckpt.directory}'
      resume.check_same_data(cfg, record, where)
      if objective.needs_reference and not peft.method:   # The same, verified reference.
        ref_entry = record.get(reference_lib.RECORD_KEY)
        if not ref_entry:
          raise ckpt_lib.CheckpointMismatchError(
              f'{where} holds no reference model in its record: it was not trained with '
              f'config.train.objective={t.objective!r}')
        ref_params = reference_lib.load(ref_entry, spec.abstract_state['params'], where)
      if adapter_only:
        peft_base = peft_run.check_base(record, where)
        full, _ = peft_run.base_params(peft_base['workdir'], peft_base['step'], model_cfg, peft,
                                       spec.param_shardings, rules, t.seed)
        state = peft_run.restore_full(state, full, spec.trainable_mask)
    # Each process reads only the rows its devices hold (processes holding the same rows, e.g.
    # different pipeline stages, read the same block). Nothing is written unless it all fits.
    build = data_lib.build_data
    if cfg.data.source == 'sft':   # Demonstration records, packed with their loss masks.
      from train.sft_data import build_sft_data as build
    elif cfg.data.source == 'preference':   # Pairs, rankings, scores (reward model, DPO).
      from train.preference_data import build_preference_data as build
    elif cfg.data.source == 'rollouts':   # Prompts; the policy samples the rest (RL).
      from train.rl.rollouts import build_rollout_data as build
    data = build(cfg, workdir, *sharding.process_rows(batch_sh, t.batch_size), resume=record,
                 resume_from=where)
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
      raise ConfigError(f'the tokenizer has {data.tokenizer.vocab_size} tokens but '
                        f'config.model.vocab_size={model_cfg.vocab_size}')
  except BaseException:
    ckpt.close()
    raise
  # A run with nothing left to train has no schedule to talk about.
  quiet = record is not None and int(jax.device_get(state['step'])) >= t.steps
  total = resume.schedule_steps(cfg, record, (lambda *_: None) if quiet else log)
  tx, schedule = optim.make_optimizer(t, total, model_cfg)
  src_step = None
  if record is not None:
    data.train.restore(record['data'])
  else:
    state = state_lib.init_state(spec, model_cfg, tx, t.seed, peft)
    if t.get('init_from') and peft.active:   # The base's weights under fresh adapters.
      state['params'], peft_base = peft_run.base_params(t.init_from, None, model_cfg, peft,
                                                        spec.param_shardings, rules, t.seed)
      log(f'Initialised the frozen base from {t.init_from} (its step {peft_base["step"]}); '
          f'{peft.method} trains {peft_run.describe(spec, model_cfg, peft)}')
    elif t.get('init_from'):  # Continued pretraining / fine-tuning: its weights, a fresh optimizer.
      state['params'], src_step = reference_lib.init_params(
          t.init_from, model_cfg, spec.abstract_state['params'], state['params'])
      log(f'Initialised parameters from {t.init_from} (its step {src_step}); optimizer and step '
          'start fresh')
  if objective.needs_reference and not peft.method and ref_params is None:
    # A fresh full-weight run against a frozen reference holds a second copy of its base.
    ref_entry = reference_lib.entry(t.init_from, src_step)
    ref_params = reference_lib.load(ref_entry, spec.abstract_state['params'],
                                    f'config.train.init_from={t.init_from!r}')

  replicated = NamedSharding(mesh, P())
  fields_sh = {k: rows_sharding(batch_sh, 1 if k in objective.row_fields else 2)
               for k in objective.batch_fields()}
  ref_sh = None if ref_params is None else spec.param_shardings
  train_step = jax.jit(
      step_lib.make_train_step(spec.graphdef, tx, schedule, grad_accum=t.grad_accum,
                               objective=objective, trainable_mask=spec.trainable_mask),
      in_shardings=(spec.state_shardings, fields_sh, ref_sh),
      out_shardings=(spec.state_shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(spec.graphdef, objective),
                      in_shardings=(spec.param_shardings, dict(fields_sh, loss_mask=batch_sh),
                                    None, ref_sh),
                      out_shardings=replicated)
  policy = None
  if objective.data_source == 'rollouts':
    from model.inference.serve_config import ServeConfig
    from train.rl.policy import Policy
    per_token = objective.per_token_advantages   # PPO: KL-shaped rewards and values now.
    policy = Policy(spec.graphdef, model_cfg, ServeConfig.from_dict(cfg.get('serve') or {}),
                    data.tokenizer, mesh=mesh, rules=rules, temperature=objective.align.temperature,
                    ref_params=ref_params, use_reference=objective.needs_reference and per_token,
                    values=per_token, namespace=workdir)
  return Run(cfg, workdir, model_cfg, mesh, rules, pipe, objective, spec, ckpt, data, state, total,
             lambda state, batch: train_step(state, batch, ref_params),
             lambda params, batch: eval_step(params, batch, None, ref_params),
             batch_sh, record is not None, peft_base if adapter_only else None, ref_entry, policy)

"""Pipeline parallelism: layers split into stages over the `pipeline` mesh axis, microbatches,
GPipe and circular schedules.

The scanned layer stack [R, ...] is cut into S stages of R/S consecutive layers (GPipe, Huang et
al. 2019), or, circular (interleaved; Narayanan et al. 2021 §2.2), into Rp*S chunks of
Lc = R/(Rp*S) layers where stage s owns chunks s, s+S, s+2S, ... and a microbatch loops through
the stages Rp times. Stage weights are stacked on a leading stage axis, [S, Rp, Lc, ...], sharded
on `pipeline` (logical name `stage`).

The schedule is written for GSPMD (as MaxText does): every iteration all S stages run at once as
a `vmap` over the stage axis (`spmd_axis_name='pipeline'`, so each pipeline device group runs only
its own stage), then the stage outputs shift by one along that axis - a `jnp.roll` of a
pipeline-sharded array, which XLA lowers to a collective permute. At iteration t stage s works on
virtual index v = t - s: microbatch v mod M at repeat v div M (idle when v is out of range).
The last stage's outputs wait in an [M, ...] buffer until stage 0 takes them for the next repeat,
so circular needs M >= S (`schedule_table` lists who works on what, and `run` follows it). There are M*Rp + S - 1 iterations, M*Rp of them useful per stage:

  bubble fraction = (S - 1) / (M*Rp + S - 1)       (GPipe: Rp = 1, Huang et al. 2019 §2.2)

Shapes: B batch, M microbatches, b = B/M rows per microbatch, T length, D d_model, S stages,
Rp circular repeats, Lc layers per chunk, R = Rp*S*Lc layers in the stack.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from model import sharding

SCHEDULES = ('gpipe', 'circular')


class PipelineError(ValueError):
  """Pipeline settings that do not fit the model, batch or mesh; the message names the field."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Resolved `config.pipeline`: S stages, M microbatches, schedule, Rp repeats (circular)."""
  stages: int = 1
  microbatches: int = 1
  schedule: str = 'gpipe'
  repeats: int = 1

  @classmethod
  def from_config(cls, pipe_cfg, mesh_pipeline: int = 1) -> 'PipelineConfig':
    """From config.pipeline {stages (0 = the mesh's pipeline size), microbatches (0 = stages),
    schedule, circular_repeats} and the mesh's pipeline axis size."""
    get = (lambda k, d: pipe_cfg.get(k, d)) if pipe_cfg is not None else (lambda k, d: d)
    stages = int(get('stages', 0)) or mesh_pipeline
    schedule = get('schedule', 'gpipe')
    if schedule not in SCHEDULES:
      raise PipelineError(f'config.pipeline.schedule={schedule!r}; expected one of {SCHEDULES}')
    repeats = int(get('circular_repeats', 2)) if schedule == 'circular' else 1
    p = cls(stages=stages, microbatches=int(get('microbatches', 0)) or stages,
            schedule=schedule, repeats=repeats)
    p.validate()
    if mesh_pipeline > 1 and p.stages != mesh_pipeline:
      raise PipelineError(f'config.pipeline.stages={p.stages} must equal the mesh pipeline axis '
                          f'size {mesh_pipeline} (config.mesh.pipeline x config.mesh.dcn.pipeline)')
    return p

  def validate(self) -> None:
    for name in ('stages', 'microbatches', 'repeats'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        field = 'circular_repeats' if name == 'repeats' else name
        raise PipelineError(f'config.pipeline.{field} must be a positive int, got {v!r}')
    if self.schedule == 'circular' and self.microbatches < self.stages:
      raise PipelineError(
          f'config.pipeline.microbatches={self.microbatches} must be >= config.pipeline.stages='
          f'{self.stages} for the circular schedule (a microbatch re-enters stage 0 only after '
          f'all stages have started)')

  @property
  def enabled(self) -> bool:
    return self.stages * self.repeats > 1 or self.microbatches > 1

  @property
  def iterations(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    return bubble_fraction(self.stages, self.microbatches, self.repeats)

  def check_fits(self, layer_groups, batch: int | None = None, batch_shards: int = 1) -> None:
    """Clear errors, before compiling, for a model or batch the pipeline cannot split."""
    if not self.enabled:
      return
    if len(layer_groups) != 1:
      raise PipelineError(
          f'pipeline parallelism needs one scanned layer group, but the model has '
          f'{len(layer_groups)} ({layer_groups}, from config.model.moe.first_dense_layers); '
          f'set first_dense_layers=0 or config.pipeline.stages=1')
    repeats, unit = layer_groups[0]
    chunks = self.stages * self.repeats
    if repeats % chunks:
      what = (f'config.pipeline.stages={self.stages}' if self.repeats == 1 else
              f'config.pipeline.stages={self.stages} x config.pipeline.circular_repeats={self.repeats}')
      if len(unit) == 1:
        raise PipelineError(f'config.model.num_layers={repeats} is not divisible by {what}; '
                            f'use a multiple of {chunks} layers')
      # A stage holds whole scanned units (MoE every `interval` layers: one unit is `interval`
      # layers), so it is the unit count that must divide, not the layer count.
      per = f'{self.stages} stages' + (f' x {self.repeats} repeats' if self.repeats > 1 else '')
      raise PipelineError(
          f'config.model.num_layers={repeats * len(unit)} is {repeats} scanned units of '
          f'{len(unit)} layers (config.model.moe.interval={len(unit)}) and {repeats} units do not '
          f'split evenly over {what}; use a multiple of {chunks * len(unit)} layers '
          f'({len(unit)}-layer units x {per})')
    if batch is not None:
      if batch % self.microbatches:
        raise PipelineError(f'the batch of {batch} rows (config.train.batch_size / grad_accum) is '
                            f'not divisible by config.pipeline.microbatches={self.microbatches}')
      if (batch // self.microbatches) % batch_shards:
        raise PipelineError(
            f'a microbatch of {batch // self.microbatches} rows (batch {batch} / '
            f'config.pipeline.microbatches={self.microbatches}) is not divisible by the '
            f'{batch_shards} batch shards of the mesh')


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle fraction of each stage: (S-1) / (M*Rp + S-1); GPipe (Rp=1): (S-1)/(M+S-1)."""
  return (stages - 1) / (microbatches * repeats + stages - 1)


def schedule_table(pcfg: PipelineConfig) -> np.ndarray:
  """int32 [iterations, S, 2]: (microbatch, repeat) that stage s works on at iteration t, or
  (-1, -1) when it idles. `run` executes exactly this table."""
  s_n, m_n, rp = pcfg.stages, pcfg.microbatches, pcfg.repeats
  v_TS = np.arange(pcfg.iterations)[:, None] - np.arange(s_n)[None, :]
  valid = (v_TS >= 0) & (v_TS < m_n * rp)
  table = np.stack([v_TS % m_n, v_TS // m_n], axis=-1)
  return np.where(valid[..., None], table, -1).astype(np.int32)


# ---- Context: the trainer turns the pipeline on while tracing its step ----------------------
_ACTIVE: list[PipelineConfig] = []


@contextlib.contextmanager
def use_pipeline(pcfg: PipelineConfig | None) -> Iterator[None]:
  """Within this context `Decoder.forward` (without a KV cache) runs its stack pipelined."""
  _ACTIVE.append(pcfg)
  try:
    yield
  finally:
    _ACTIVE.pop()


def active() -> PipelineConfig | None:
  p = _ACTIVE[-1] if _ACTIVE else None
  return p if p is not None and p.enabled else None


# ---- The schedule -----------------------------------------------------------------------------

def _constrain(x, names):
  return sharding.constrain(x, names) if names is not None and len(names) == x.ndim else x


def to_stages(a_R, names, pcfg: PipelineConfig):
  """[R, ...] -> [S, Rp, Lc, ...]: chunk c = r*S + s of depth order goes to [s, r], stage dim
  on `stage`. For GPipe (Rp=1) stage s gets layers [s*R/S, (s+1)*R/S): the contiguous block the
  `layers` rule already put on pipeline device s, so nothing moves."""
  s, rp = pcfg.stages, pcfg.repeats
  a = a_R.reshape(rp, s, a_R.shape[0] // (rp * s), *a_R.shape[1:]).swapaxes(0, 1)
  rest = tuple(names[1:]) if names is not None and len(names) == a_R.ndim else None
  return _constrain(a, None if rest is None else ('stage', None, None) + rest)


def from_stages(a_S):
  """[S, Rp, Lc, ...] -> [R, ...] in depth order (inverse of `to_stages`)."""
  a = a_S.swapaxes(0, 1)
  return a.reshape(-1, *a.shape[3:])


def run(stage_fn: Callable, params, names, per_layer, x_BTD: jax.Array, pcfg: PipelineConfig):
  """Runs the layer stack pipelined. -> (x_BTD, aux).

  stage_fn(params_chunk, x_bTD, per_layer_chunk) -> (x_bTD, aux_chunk) applies Lc layers; its
  params/per_layer leaves are [Lc, ...] and aux leaves [Lc, ...]. `params`, `per_layer`: pytrees
  of [R, ...] leaves; `names`: the logical names of each leaf of `params` in
  `jax.tree.leaves` order (for the stage sharding), or None. aux comes back as [R, ...] leaves
  averaged over the microbatches.
  """
  s_n, m_n, rp = pcfg.stages, pcfg.microbatches, pcfg.repeats
  b, t, d = x_BTD.shape
  leaves, treedef = jax.tree.flatten(params)
  names = [None] * len(leaves) if names is None else list(names)
  params_S = treedef.unflatten([to_stages(a, n, pcfg) for a, n in zip(leaves, names)])
  per_layer_S = jax.tree.map(lambda a: to_stages(a, None, pcfg), per_layer)

  # Microbatch m takes rows m, m+M, m+2M, ...: the row-sharded batch splits with no data
  # movement (the mean loss does not care which rows share a microbatch).
  act = ('batch', 'length', 'act_embed')
  buf_MbTD = _constrain(x_BTD.reshape(b // m_n, m_n, t, d).swapaxes(0, 1), (None,) + act)

  def stage_step(p_RpLc, r, x_bTD, pl_RpLc):
    pick = lambda a: a[0] if rp == 1 else jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False)
    return stage_fn(jax.tree.map(pick, p_RpLc), x_bTD, jax.tree.map(pick, pl_RpLc))

  # Inside the vmap, constraints get the stage dim on `pipeline`: each stage stays on its devices.
  spmd = 'pipeline' if sharding.active_mesh() is not None else None
  stages_fn = jax.vmap(stage_step, spmd_axis_name=spmd)
  aux_shape = jax.eval_shape(stages_fn, params_S, jnp.zeros((s_n,), jnp.int32),
                             jax.ShapeDtypeStruct((s_n, b // m_n, t, d), x_BTD.dtype),
                             per_layer_S)[1]
  aux0 = jax.tree.map(lambda a: jnp.zeros((a.shape[0], rp) + a.shape[1:], jnp.float32), aux_shape)
  state0 = _constrain(jnp.zeros((s_n, b // m_n, t, d), x_BTD.dtype), ('stage',) + act)
  stage_ids = jnp.arange(s_n)

  def iteration(carry, work_S2):
    state_SbTD, buf_MbTD, aux_acc = carry
    valid_S = work_S2[:, 0] >= 0
    m_S, r_S = jnp.maximum(work_S2[:, 0], 0), jnp.maximum(work_S2[:, 1], 0)
    # Stage s>0 takes stage s-1's last output (collective permute); stage 0 takes microbatch
    # m from the buffer (the input, or its output from the previous repeat).
    shifted = jnp.roll(state_SbTD, 1, axis=0)
    first = jax.lax.dynamic_index_in_dim(buf_MbTD, m_S[0], 0, keepdims=True)
    in_SbTD = _constrain(jnp.where((stage_ids == 0)[:, None, None, None], first, shifted),
                         ('stage',) + act)
    out_SbTD, aux_S = stages_fn(params_S, r_S, in_SbTD, per_layer_S)
    out_SbTD = _constrain(out_SbTD, ('stage',) + act)
    # The last stage's output goes back to the buffer (only when it is a real microbatch).
    old = jax.lax.dynamic_index_in_dim(buf_MbTD, m_S[-1], 0, keepdims=False)
    new = jnp.where(valid_S[-1], out_SbTD[-1], old)
    buf_MbTD = jax.lax.dynamic_update_index_in_dim(buf_MbTD, new, m_S[-1], 0)

    def add(acc_SRp, a_S):
      keep = valid_S.reshape((-1,) + (1,) * (a_S.ndim - 1))
      return acc_SRp.at[stage_ids, r_S].add(jnp.where(keep, a_S.astype(jnp.float32), 0.0))

    return (out_SbTD, buf_MbTD, jax.tree.map(add, aux_acc, aux_S)), None

  (_, buf_MbTD, aux_acc), _ = jax.lax.scan(iteration, (state0, buf_MbTD, aux0),
                                          jnp.asarray(schedule_table(pcfg)))
  y_BTD = buf_MbTD.swapaxes(0, 1).reshape(b, t, d)
  aux = jax.tree.map(lambda a, s: (from_stages(a) / m_n).astype(s.dtype), aux_acc, aux_shape)
  return _constrain(y_BTD, act), aux

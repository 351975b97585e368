"""Logical axis names -> mesh axes. The only module that knows mesh axis names.

Parameters and main activations are annotated with logical names (`embed`, `mlp`, `heads`,
`kv_heads`, `head_dim`, `vocab`, `expert`, `layers`, `stage` for weights; `batch`, `length`,
`act_embed`, `act_heads`, `act_mlp`, `act_vocab` for activations). A rule table maps each logical
name to zero or more mesh axes. Activations use their own `act_*` names so that FSDP can shard
weights on `embed` while activations stay sharded on `batch` only.

Mesh axes, outermost first (the order decides which devices are neighbours):
  data, pipeline   little traffic (a gradient reduce per step, a stage hand-off per microbatch):
                   outermost, so they are the axes that cross slices (DCN).
  fsdp, expert     weight all-gathers / token all-to-alls per layer.
  sequence, tensor collectives inside every matmul: innermost, on the nearest ICI links.
(MaxText orders its axes the same way: data and stage outer, tensor inner.)

Each axis has an in-slice (ICI) size `config.mesh.<axis>` and a cross-slice size
`config.mesh.dcn.<axis>`; the mesh axis is their product. One ICI size may be -1 (fill).
`config.mesh.preset` names a rule table + fill axis from PRESETS (see `mesh_from_config`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'pipeline', 'fsdp', 'expert', 'sequence', 'tensor')

# Every logical name the model uses, replicated; presets and DEFAULT_RULES override some.
_ALL_REPLICATED = dict(
    batch=None, length=None, act_embed=None, act_heads=None, act_kv_heads=None, act_mlp=None,
    act_vocab=None, vocab=None, embed=None, mlp=None, heads=None, kv_heads=None, head_dim=None,
    expert=None, cache_length=None,  # KV cache slots (model/inference/kv_cache.py).
    # The stacked layer axis is split into contiguous blocks over the pipeline axis: block s is
    # pipeline stage s's layers, so reshaping [R, ...] -> [stages, R/stages, ...] moves nothing.
    layers='pipeline', stage='pipeline')


def _rules(**overrides) -> tuple[tuple[str, Any], ...]:
  return tuple({**_ALL_REPLICATED, **overrides}.items())


_TENSOR = dict(vocab='tensor', mlp='tensor', heads='tensor', act_heads='tensor', act_mlp='tensor',
               act_vocab='tensor')

# One rule per logical name; the value is a mesh axis, a tuple of them, or None (replicated).
# Non-MoE compute stays data-parallel over the expert axis (batch includes it, GShard §3.2).
DEFAULT_RULES = _rules(batch=('data', 'fsdp', 'expert'), length='sequence', embed='fsdp',
                       expert='expert', **_TENSOR)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named parallelism layout: `fill` takes the devices left over (-1), `sized` axes take
  their size from config.mesh, every other axis except pipeline must be 1."""
  fill: str
  sized: tuple[str, ...]
  rules: tuple[tuple[str, Any], ...]
  doc: str


PRESETS = {
    'data': Preset('data', (), _rules(batch='data'), 'pure data parallel: weights replicated'),
    'fsdp': Preset('fsdp', ('data',), _rules(batch=('data', 'fsdp'), embed='fsdp'),
                   'ZeRO-3 / FSDP: weights and optimizer state sharded on embed, batch on fsdp'),
    'fsdp_tensor': Preset('fsdp', ('data', 'tensor'),
                          _rules(batch=('data', 'fsdp'), embed='fsdp', **_TENSOR),
                          'FSDP + Megatron tensor parallel (heads, mlp, vocab on tensor)'),
    'tensor_sequence': Preset('data', ('tensor', 'sequence'),
                              _rules(batch='data', length='sequence', **_TENSOR),
                              'tensor parallel + activations sharded on length'),
    'expert': Preset('expert', ('data',), _rules(batch=('data', 'expert'), expert='expert'),
                     'expert parallel: experts on expert, batch on data x expert'),
}


class ShardingError(ValueError):
  """Mesh or rule misconfiguration, named by config field."""


def check_rules(rules: Sequence[tuple[str, object]]) -> dict[str, tuple[str, ...]]:
  """Returns {logical: (mesh axes...)}; rejects duplicates, unknown axes and an axis listed
  twice in one rule."""
  table: dict[str, tuple[str, ...]] = {}
  for name, axes in rules:
    if name in table:
      raise ShardingError(f'config.mesh.rules maps logical axis {name!r} twice; keep one rule per name')
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
      if a not in MESH_AXES:
        raise ShardingError(f'config.mesh.rules: {name!r} -> unknown mesh axis {a!r}; known: {MESH_AXES}')
    if len(set(axes)) != len(axes):
      raise ShardingError(f'config.mesh.rules: {name!r} -> {axes} lists a mesh axis twice')
    table[name] = axes
  return table


# ---- Meshes ------------------------------------------------------------------------------------

def _axis_sizes(shape: Mapping[str, int], field: str) -> dict[str, int]:
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ShardingError(f'{field} has unknown axes {unknown}; known: {MESH_AXES}')
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise ShardingError(f'{field} sizes must be positive (or -1 to fill), got {bad}')
  return sizes


def mesh_shape(shape: Mapping[str, int], n_devices: int,
               dcn: Mapping[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
  """(ICI sizes, DCN sizes) per axis with the -1 filled; the mesh axis is their product.

  The -1 fills the in-slice part: n_devices / prod(DCN) devices per slice.
  """
  ici = _axis_sizes(shape, 'config.mesh')
  dcn_sizes = _axis_sizes(dcn or {}, 'config.mesh.dcn')
  if -1 in dcn_sizes.values():
    raise ShardingError(f'config.mesh.dcn sizes must be explicit (no -1), got {dcn_sizes}')
  n_slices = math.prod(dcn_sizes.values())
  if n_devices % n_slices:
    raise ShardingError(f'config.mesh.dcn sizes {dcn_sizes} multiply to {n_slices} slices, which '
                        f'does not divide the {n_devices} devices')
  per_slice = n_devices // n_slices
  fill = [a for a, s in ici.items() if s == -1]
  if len(fill) > 1:
    raise ShardingError(f'config.mesh: only one axis may be -1, got {fill}')
  fixed = math.prod(s for s in ici.values() if s != -1)
  if fill:
    if per_slice % fixed:
      raise ShardingError(f'config.mesh: {per_slice} devices per slice are not divisible by the '
                          f'fixed axes product {fixed} ({ici})')
    ici[fill[0]] = per_slice // fixed
  total = {a: ici[a] * dcn_sizes[a] for a in MESH_AXES}
  if math.prod(total.values()) != n_devices:
    shown = total if n_slices == 1 else {a: f'{ici[a]}x{dcn_sizes[a]}' for a in MESH_AXES}
    raise ShardingError(f'config.mesh sizes {shown} multiply to {math.prod(total.values())}, '
                        f'but there are {n_devices} devices')
  return ici, dcn_sizes


def _granules(devices: Sequence[Any], n: int) -> list[list[Any]]:
  """Devices grouped into `n` slices: by slice_index on TPU, else by process then id (a CPU
  run treats equal contiguous blocks as slices, so the layout arithmetic can be tested)."""
  if all(getattr(d, 'slice_index', None) is not None for d in devices):
    by: dict[int, list] = {}
    for d in devices:
      by.setdefault(d.slice_index, []).append(d)
    if len(by) == n:
      return [by[k] for k in sorted(by)]
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  per = len(ordered) // n
  return [ordered[i * per:(i + 1) * per] for i in range(n)]


def hybrid_device_array(ici: Mapping[str, int], dcn: Mapping[str, int],
                        devices: Sequence[Any]) -> np.ndarray:
  """Device array of shape [ici[a] * dcn[a] for a in MESH_AXES]: along every axis the DCN index
  is the outer part, so each slice holds one contiguous ICI block (as
  `mesh_utils.create_hybrid_device_mesh` lays it out)."""
  ici_shape = [ici[a] for a in MESH_AXES]
  dcn_shape = [dcn[a] for a in MESH_AXES]
  if devices and devices[0].platform == 'tpu':  # Real slices: jax's own hybrid layout.
    from jax.experimental import mesh_utils
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                allow_split_physical_axes=True)
  slices = _granules(devices, math.prod(dcn_shape))
  per_slice = [_ici_array(s, ici_shape) for s in slices]
  blocks = np.empty(dcn_shape, dtype=object)
  for i, idx in enumerate(np.ndindex(*dcn_shape)):
    blocks[idx] = per_slice[i]
  return np.block(blocks.tolist())


def _ici_array(devices: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
  if devices and devices[0].platform == 'tpu':
    from jax.experimental import mesh_utils  # Physical-topology aware (ICI rings, twisted tori).
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
  """Builds a mesh over `devices` (default: all) from {axis: ICI size} (one may be -1) and
  optional {axis: DCN size}; missing axes are 1."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn_sizes = mesh_shape(shape, len(devices), dcn)
  if math.prod(dcn_sizes.values()) == 1:
    arr = _ici_array(devices, [ici[a] for a in MESH_AXES])
  else:
    arr = hybrid_device_array(ici, dcn_sizes, devices)
  return Mesh(arr, MESH_AXES)


def resolve_preset(mesh_cfg: Mapping[str, Any]) -> tuple[dict[str, int], tuple]:
  """(ICI sizes with the preset's fill axis at -1, rules) from config.mesh.

  Without a preset (''), the sizes and `rules` are used as written. With one, its rules replace
  config.mesh.rules; its `fill` axis takes the devices left over, its `sized` axes and pipeline
  take config.mesh.<axis> (-1 there means 1: the preset picks the fill), and any other axis
  set above 1 is an error rather than silently ignored.
  """
  name = mesh_cfg.get('preset', '') or ''
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  if not name:
    return sizes, tuple(mesh_cfg.get('rules', DEFAULT_RULES))
  if name not in PRESETS:
    raise ShardingError(f'config.mesh.preset={name!r}; expected one of {sorted(PRESETS)} or '
                        "'' (custom sizes and rules)")
  preset = PRESETS[name]
  out = {}
  for a, s in sizes.items():
    if a == preset.fill:
      out[a] = -1
    elif a in preset.sized or a == 'pipeline':
      out[a] = 1 if s == -1 else s
    elif s > 1:
      raise ShardingError(f'config.mesh.{a}={s}, but preset {name!r} ({preset.doc}) does not use '
                          f"the {a} axis; set config.mesh.preset='' for a custom mesh")
    else:
      out[a] = 1
  return out, preset.rules


def mesh_from_config(mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None
                     ) -> tuple[Mesh, dict[str, tuple[str, ...]]]:
  """(Mesh, checked rules) from config.mesh: axis sizes, optional `dcn` sizes, `preset`, `rules`."""
  sizes, rules = resolve_preset(mesh_cfg)
  dcn = mesh_cfg.get('dcn', None)
  return make_mesh(sizes, devices, dict(dcn) if dcn else None), check_rules(rules)


def batch_shards(mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> int:
  """How many ways the `batch` logical axis is split on this mesh."""
  return math.prod(mesh.shape[a] for a in rules.get('batch', ()))


def process_rows(sh: NamedSharding, global_rows: int) -> tuple[int, int]:
  """(index, count) of this process's block of rows of a [global_rows, ...] array with sharding
  `sh`: processes whose devices hold the same rows share a block (e.g. pipeline stages or tensor
  shards on different hosts all read the same rows), so the data loader feeds each process only
  the rows its devices hold."""
  blocks = {}
  for d, idx in sh.devices_indices_map((global_rows,) + (1,) * max(len(sh.spec) - 1, 0)).items():
    rows = range(global_rows)[idx[0]]
    lo, hi = blocks.get(d.process_index, (global_rows, 0))
    blocks[d.process_index] = (min(lo, rows.start), max(hi, rows.stop))
  distinct = sorted(set(blocks.values()))
  sizes = {hi - lo for lo, hi in distinct}
  if len(sizes) != 1 or sum(hi - lo for lo, hi in distinct) != global_rows:
    raise ShardingError(f'the mesh gives processes overlapping or uneven row blocks {distinct} of '
                        f'the {global_rows}-row batch; reorder config.mesh so batch axes are outer')
  return distinct.index(blocks[jax.process_index()]), len(distinct)


# ---- Logical names -> PartitionSpec ------------------------------------------------------------

def logical_to_spec(names: Sequence[str | None], rules: dict[str, tuple[str, ...]],
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """Maps logical names to a PartitionSpec. A mesh axis used by two dims of one tensor is an
  error (whatever the sizes, so a bad rule table fails on one device too). Dims whose size a
  mesh axis does not divide stay replicated (e.g. one MQA KV head on a 4-way tensor axis)."""
  seen: dict[str, str] = {}
  out = []
  for i, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ShardingError(f'logical axis {name!r} has no rule in config.mesh.rules')
    axes = rules[name]
    for a in axes:
      if a in seen:
        raise ShardingError(
            f'config.mesh.rules map logical axes {seen[a]!r} and {name!r} of one tensor '
            f'{tuple(names)} both to mesh axis {a!r}; a mesh axis can shard one dim only')
      seen[a] = name
    if shape is not None and mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


# ---- Activation constraints ------------------------------------------------------------------
_ACTIVE: list[tuple[Mesh, dict[str, tuple[str, ...]]]] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> Iterator[None]:
  """Within this context `constrain` pins activations to the mesh (used while tracing a step)."""
  _ACTIVE.append((mesh, rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.pop()


def active_rules() -> tuple[Mesh, dict[str, tuple[str, ...]]] | None:
  """(mesh, rules) of the innermost `use_mesh`, or None outside one."""
  return _ACTIVE[-1] if _ACTIVE else None


def active_mesh() -> Mesh | None:
  return _ACTIVE[-1][0] if _ACTIVE else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  spec = logical_to_spec(names, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def to_host(tree):
  """`jax.device_get`, also for arrays spanning other processes' devices (a multi-host run's
  engine step or scoring forward): those are all-gathered, so every process must call this in
  the same order, as SPMD code does anyway."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.device_get(a)
  return jax.tree.map(one, tree)

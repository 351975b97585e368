"""Logical axis names -> mesh axes. The only module that knows mesh axis names.

Parameters and main activations are annotated with logical names (`embed`, `mlp`, `heads`,
`kv_heads`, `head_dim`, `vocab`, `layers` for weights; `batch`, `length`, `act_embed`,
`act_heads`, `act_mlp`, `act_vocab` for activations). A rule table maps each logical name to
zero or more mesh axes. Activations use their own `act_*` names so that FSDP can shard weights
on `embed` while activations stay sharded on `batch` only.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# One rule per logical name; the value is a mesh axis, a tuple of them, or None (replicated).
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', None),
    ('head_dim', None),
    ('layers', None),
    ('expert', None),       # MoE expert weights; an expert-parallel mesh axis maps it later.
)


class ShardingError(ValueError):
  """Mesh or rule misconfiguration, named by config field."""


def check_rules(rules: Sequence[tuple[str, object]]) -> dict[str, tuple[str, ...]]:
  """Returns {logical: (mesh axes...)}; rejects duplicates and unknown mesh axes."""
  table: dict[str, tuple[str, ...]] = {}
  for name, axes in rules:
    if name in table:
      raise ShardingError(f'config.mesh.rules maps logical axis {name!r} twice; keep one rule per name')
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
      if a not in MESH_AXES:
        raise ShardingError(f'config.mesh.rules: {name!r} -> unknown mesh axis {a!r}; known: {MESH_AXES}')
    table[name] = axes
  return table


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over `devices` (default: all) from {axis: size}; one size may be -1 (fill)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ShardingError(f'config.mesh has unknown axes {unknown}; known: {MESH_AXES}')
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ShardingError(f'config.mesh: only one axis may be -1, got {fill}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if len(devices) % fixed:
      raise ShardingError(f'config.mesh: {len(devices)} devices are not divisible by the fixed axes '
                          f'product {fixed} ({sizes})')
    sizes[fill[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ShardingError(f'config.mesh sizes {sizes} multiply to {math.prod(sizes.values())}, '
                        f'but there are {len(devices)} devices')
  arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules: dict[str, tuple[str, ...]],
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """Maps logical names to a PartitionSpec. Dims whose size a mesh axis does not divide stay
  replicated (e.g. one MQA KV head on a 4-way tensor axis), and no mesh axis is used twice."""
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ShardingError(f'logical axis {name!r} has no rule in config.mesh.rules')
    axes = tuple(a for a in rules[name] if a not in used)
    if shape is not None and mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
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


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  spec = logical_to_spec(names, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

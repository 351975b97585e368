"""Expert parallelism for `model.moe.MoE`: experts split over a mesh axis, tokens by all-to-all.

Used when the active `sharding.use_mesh` rules map the logical `expert` axis to a mesh axis of
size X > 1. Inside `jax.shard_map` each device holds its block of the [B, T] tokens (rows split
over the `batch` rule's axes plus the expert axis, positions over the `length` axes) and E/X
experts (their hidden dim split over the `mlp` axes, if any). Routing, the aux losses and the
load statistics stay outside, under GSPMD, so they are global by construction.

Shapes (as in `model.moe` / `model.moe_kernels`; a lowercase letter is a part of its uppercase
one, like the pipeline's b = B/M): i a device's local tokens (n of them), D d_model, E experts,
e = E/X local experts (l of them), X expert shards, A top-k choices (k), J capacity groups on this
device (g), Z tokens per group (s), C capacity (c), Y token-slots, y the rows one device sends to
one expert shard (dropless; r of them), Q = X*y rows an expert shard receives.

Capacity mode (GShard, Lepikhin et al. 2020 §2.2: groups are local to a device): each device
fills per-(group, expert) buffers [J, E, C, D], all-to-all sends expert shard x its [J, e, C, D]
slice, the local experts run on [J*X, e, C, D], a second all-to-all brings results back.
- capacity_group='sequence': a group is one sequence and sequences never straddle devices, so
  outputs and drops equal the unsharded layer exactly.
- capacity_group='batch': unsharded, all B*T tokens are one group; here the group is this
  device's n tokens with C = capacity(n), as in GShard. Without overflow the outputs are equal;
  with overflow *which* slots drop can differ (each device ranks only its own tokens). The
  reported dropped_fraction is the global one (mean over equal-size shards).
Dropless mode: each device sorts its token-slots by expert and sends expert shard x the ones
for x's experts in a buffer of the worst-case size r = n*min(k, l) (static shapes for
`all_to_all`), with per-expert counts; the receiver regroups rows by local expert for the
grouped matmul (`moe_kernels.experts_ragged`). Exact, but the buffers are X*r rows where n*k
arrive on average: X*min(k, l)/k times the traffic, and on CPU (block-padded matmul over the whole
buffer) that much compute too. A ragged all-to-all would shrink the traffic, not the buffer.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from model import moe_kernels, sharding


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Layout inside the shard_map: experts split over `expert_axis`; tokens [B, T] over
  (`batch_axes`, `length_axes`); each expert's hidden dim F over `mlp_axes` (tensor-parallel
  experts: the partial outputs are summed once, on the combined [B, T, D])."""
  mesh: Mesh
  expert_axis: str
  batch_axes: tuple[str, ...]
  length_axes: tuple[str, ...]
  mlp_axes: tuple[str, ...]

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[self.expert_axis]

  @property
  def token_axes(self) -> tuple[str, ...]:
    return self.batch_axes + self.length_axes


def _size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def active_plan(moe_cfg, batch: int, length: int) -> ExpertParallel | None:
  """The expert-parallel layout under the innermost `sharding.use_mesh`, or None (single-device
  code path, GSPMD-partitioned) when there is no mesh, the `expert` rule maps to no mesh axis of
  size > 1, or the batch does not split over the batch axes (e.g. decoding fewer rows than
  devices: correct, but the expert weights get gathered)."""
  active = sharding.active_rules()   # The mesh and rules of the step being traced.
  if active is None:
    return None
  mesh, rules = active
  on = lambda name, used=(): tuple(a for a in rules.get(name, ())
                                    if mesh.shape.get(a, 1) > 1 and a not in used)
  axes = on('expert')
  if not axes:
    return None
  if len(axes) > 1:
    raise sharding.ShardingError(
        f"config.mesh.rules maps the logical axis 'expert' to mesh axes {axes}; expert "
        'parallelism supports exactly one mesh axis')
  axis = axes[0]
  x = mesh.shape[axis]
  if moe_cfg.num_experts % x:
    raise sharding.ShardingError(
        f'config.model.moe.num_experts={moe_cfg.num_experts} is not divisible by the size {x} of '
        f"mesh axis {axis!r} (config.mesh.{axis}) that the 'expert' rule shards experts over")
  # Tokens also split over the expert axis (GShard §3.2): each device routes its own tokens.
  batch_axes = on('batch')
  batch_axes += () if axis in batch_axes else (axis,)
  if batch % _size(mesh, batch_axes):
    return None
  # Capacity groups of one sequence must stay whole on a device.
  whole_rows = moe_cfg.dispatch == 'capacity' and moe_cfg.capacity_group == 'sequence'
  length_axes = () if whole_rows else on('length', batch_axes)
  if length % _size(mesh, length_axes):
    length_axes = ()  # e.g. one decoding step: replicated over the length axes.
  mlp_axes = on('mlp', batch_axes + length_axes)
  if moe_cfg.expert_mlp_dim % _size(mesh, mlp_axes):
    mlp_axes = ()
  return ExpertParallel(mesh, axis, batch_axes, length_axes, mlp_axes)


def expert_parallel_ffn(cfg, moe_cfg, plan: ExpertParallel, x_BTD, idx_BTA, weights_BTA,
                        expert_weights):
  """Routed expert FFN with experts split over `plan.expert_axis`.

  x_BTD [B, T, D], idx_BTA / weights_BTA [B, T, A] (the router's choices and gate weights),
  expert_weights (w_gate [E,D,F], w_up [E,D,F] or None, w_down [E,F,D]).
  -> (y_BTD float32, dropped fraction of token-slots, a float32 scalar).
  """
  tok = P(_entry(plan.batch_axes), _entry(plan.length_axes), None)
  ex, mlp = plan.expert_axis, _entry(plan.mlp_axes)
  w_gate, w_up, w_down = expert_weights
  ws = (w_gate, w_down) if w_up is None else (w_gate, w_up, w_down)
  w_specs = (P(ex, None, mlp),) * (len(ws) - 1) + (P(ex, mlp, None),)

  def unpack(ws):
    return (ws[0], None, ws[1]) if len(ws) == 2 else ws

  def capacity_local(x_iD, idx_iA, w_iA, ws, t):
    n, d = x_iD.shape
    x, e = plan.num_shards, moe_cfg.num_experts
    s = t if moe_cfg.capacity_group == 'sequence' else n
    g, c = n // s, moe_cfg.capacity(s)
    slot_JY, kept = moe_kernels.capacity_slots(idx_iA, g, s, e, c)
    x_JECD = moe_kernels.dispatch(x_iD.reshape(g, s, d), slot_JY, e, c, jnp.dtype(cfg.dtype))
    # Send expert shard j the buffers of its experts; receive [J, X sources, e, C, D].
    recv = jax.lax.all_to_all(x_JECD.reshape(g, x, e // x, c, d), ex, 1, 1, tiled=True)
    out = moe_kernels.experts_dense(cfg, recv.reshape(g * x, e // x, c, d), *unpack(ws))
    back = jax.lax.all_to_all(out.reshape(g, x, e // x, c, d), ex, 1, 1, tiled=True)
    y_JZD = moe_kernels.combine(back.reshape(g, e, c, d), slot_JY, w_iA)
    return y_JZD.reshape(n, d), 1.0 - kept

  def dropless_local(x_iD, idx_iA, w_iA, ws, t):
    del t
    n, d = x_iD.shape
    k = idx_iA.shape[-1]
    x, e = plan.num_shards, moe_cfg.num_experts
    l = e // x
    r = n * min(k, l)  # A token sends at most min(k, l) slots to one expert shard.
    # Sender: slots sorted by expert are also sorted by destination shard (= expert // l).
    expert_Y = idx_iA.reshape(-1)                 # slot m = token*k + choice
    order_Y = jnp.argsort(expert_Y, stable=True)  # sorted position -> slot
    dest_Y = expert_Y[order_Y] // l
    counts_Xe = jnp.bincount(expert_Y, length=e).astype(jnp.int32).reshape(x, l)
    start_X = jnp.cumsum(counts_Xe.sum(-1)) - counts_Xe.sum(-1)
    row_Y = jnp.arange(n * k) - start_X[dest_Y]   # Row of each sorted slot in its send buffer.
    # Scatter-adds below write distinct rows (a set whose transpose is a plain gather).
    send_XyD = jnp.zeros((x, r, d), x_iD.dtype).at[dest_Y, row_Y].add(x_iD[order_Y // k])
    recv_XyD = jax.lax.all_to_all(send_XyD, ex, 0, 0, tiled=True)
    recv_Xe = jax.lax.all_to_all(counts_Xe, ex, 0, 0, tiled=True)
    # Receiver: source s's rows are sorted by local expert; rows past its total are padding (l).
    ends_Xe = jnp.cumsum(recv_Xe, axis=-1)
    # local[s, q] = #experts whose rows end at or before q (a searchsorted per source).
    marks_Xy = jnp.zeros((x, r + 1), jnp.int32).at[jnp.arange(x)[:, None], ends_Xe].add(1)
    local_Xy = jnp.cumsum(marks_Xy, axis=1)[:, :r]
    local_Q = local_Xy.reshape(-1)                # q = source*r + row
    order_Q = jnp.argsort(local_Q, stable=True)
    sizes_e = jnp.bincount(local_Q, length=l + 1)[:l].astype(jnp.int32)
    rows_QD = recv_XyD.reshape(x * r, d)[order_Q]
    out_sorted_QD = moe_kernels.experts_ragged(cfg, rows_QD, sizes_e, *unpack(ws))
    out_XyD = jnp.zeros_like(out_sorted_QD).at[order_Q].add(out_sorted_QD).reshape(x, r, d)
    back_XyD = jax.lax.all_to_all(out_XyD, ex, 0, 0, tiled=True)
    out_YD = jnp.zeros((n * k, d), back_XyD.dtype).at[order_Y].add(back_XyD[dest_Y, row_Y])
    y_iD = jnp.einsum('nkd,nk->nd', out_YD.reshape(n, k, d).astype(jnp.float32),
                      w_iA.astype(jnp.float32))
    return y_iD, jnp.zeros((), jnp.float32)

  def local(x_btD, idx_btA, w_btA, *ws):
    b, t, d = x_btD.shape
    k = idx_btA.shape[-1]
    fn = dropless_local if moe_cfg.dispatch == 'dropless' else capacity_local
    y_iD, dropped = fn(x_btD.reshape(b * t, d), idx_btA.reshape(b * t, k),
                       w_btA.reshape(b * t, k), ws, t)
    if plan.mlp_axes:  # Each device summed over its slice of F only.
      y_iD = jax.lax.psum(y_iD, plan.mlp_axes)
    # Equal-size token shards: the mean of the local fractions is the global fraction.
    return y_iD.reshape(b, t, d), jax.lax.pmean(dropped, plan.token_axes)

  f = jax.shard_map(local, mesh=plan.mesh, in_specs=(tok, tok, tok) + w_specs,
                    out_specs=(tok, P()), check_vma=True)
  return f(x_BTD, idx_BTA, weights_BTA, *ws)

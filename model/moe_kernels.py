"""MoE kernels shared by the single-device layer (`model.moe`) and expert parallelism
(`model.moe_parallel`): the expert FFNs on capacity buffers or expert-sorted rows, and capacity
dispatch / combine. No routing and no sharding here.

Shapes: D d_model, E experts, F expert mlp dim, A top-k choices per token (k of them), I tokens,
J capacity groups (g of them), Z tokens per group (s), C expert capacity per group (c), Y
token-slots (I*k; in a group, Z*k), O blocks of the block-padded grouped matmul, W rows per block.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import ACTIVATION_FNS, matmul


def _bmatmul(eq: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """`layers.matmul` for the expert-batched einsums. XLA:CPU (jax 0.10.2) has no DotThunk for some
  batched bf16 x bf16 -> f32 dots ("Unsupported element type"), so on CPU those run in float32."""
  if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == 'cpu':
    return jnp.einsum(eq, x.astype(jnp.float32), w.astype(jnp.float32)).astype(dtype)
  return matmul(eq, x, w, dtype)


def experts_dense(cfg: ModelConfig, x_JECD, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
  """Per-expert FFN on capacity buffers [J, E, C, D] -> [J, E, C, D] (E may be a local shard)."""
  dtype = jnp.dtype(cfg.dtype)
  h_JECF = ACTIVATION_FNS[cfg.activation](_bmatmul('gecd,edf->gecf', x_JECD, w_gate_EDF, dtype))
  if w_up_EDF is not None:
    h_JECF = h_JECF * _bmatmul('gecd,edf->gecf', x_JECD, w_up_EDF, dtype)
  return _bmatmul('gecf,efd->gecd', h_JECF, w_down_EFD, dtype)


GMM_BLOCK = 128  # Rows per block of the block-padded grouped matmul (CPU).


def native_grouped_matmul() -> bool:
  """Whether `jax.lax.ragged_dot` is a real grouped matmul here. TPU lowers it to its ragged-dot
  instruction and GPU to a kernel; XLA:CPU (jax 0.10.2) expands it into a masked dense matmul per
  group, E times the useful FLOPs."""
  return jax.default_backend() != 'cpu'


def _count_at_or_below(ends_E, n: int):
  """[n]: how many of the sorted `ends_E` are <= i, for i < n (searchsorted side='right'). A
  scatter-add + cumsum: O(n + E), and no loop (jnp.searchsorted's scan trips shard_map's
  replication check under the pipeline's vmap)."""
  marks = jnp.zeros((n + 1,), jnp.int32).at[jnp.minimum(ends_E, n)].add(1)
  return jnp.cumsum(marks)[:n]


def _block_layout(group_sizes_E, m: int):
  """MegaBlocks-style padding (Gale et al. 2022 §5): each group's rows start a fresh block of W
  rows, so every block belongs to one expert. -> (destination row of each sorted row in the
  padded [O*W] layout, out of range for rows past sum(group_sizes), expert of each block [O],
  O as p, W as b). O is static: at most E*(W-1) rows of padding in all."""
  e = group_sizes_E.shape[0]
  b = min(GMM_BLOCK, max(8, 1 << max(0, math.ceil(m / e) - 1).bit_length()))
  p = -(-(m + e * (b - 1)) // b)
  ends_E = jnp.cumsum(group_sizes_E)
  padded_E = -(-group_sizes_E // b) * b
  padded_ends_E = jnp.cumsum(padded_E)
  expert_Y = _count_at_or_below(ends_E, m)  # Row -> expert; E = past the last group.
  safe_Y = jnp.minimum(expert_Y, e - 1)
  start_Y = (padded_ends_E - padded_E)[safe_Y]          # Padded start of the row's group.
  dest_Y = start_Y + jnp.arange(m) - (ends_E - group_sizes_E)[safe_Y]
  dest_Y = jnp.where(expert_Y < e, dest_Y, p * b)
  block_expert_O = jnp.minimum(_count_at_or_below(padded_ends_E // b, p), e - 1)
  return dest_Y, block_expert_O, p, b


def experts_ragged(cfg: ModelConfig, x_YD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Per-expert FFN on expert-sorted rows [Y, D] -> [Y, D] (grouped matmul). Rows past
  sum(group_sizes_E) belong to no expert and come back as zeros."""
  dtype = jnp.dtype(cfg.dtype)
  act = ACTIVATION_FNS[cfg.activation]
  if native_grouped_matmul():
    def rdot(a, w):  # float32 accumulation, as in layers.matmul.
      return jax.lax.ragged_dot(a.astype(dtype), w.astype(dtype), group_sizes_E,
                                preferred_element_type=jnp.float32).astype(dtype)

    h_YF = act(rdot(x_YD, w_gate_EDF))
    if w_up_EDF is not None:
      h_YF = h_YF * rdot(x_YD, w_up_EDF)
    return rdot(h_YF, w_down_EFD)
  # Block-padded grouped matmul: each block multiplies its own expert's (gathered) weights.
  m, d = x_YD.shape
  dest_Y, expert_O, p, b = _block_layout(group_sizes_E, m)
  # Scatter-adds into distinct rows: same as a set, and the transpose is a plain gather.
  x_OWD = jnp.zeros((p * b, d), x_YD.dtype).at[dest_Y].add(x_YD, mode='drop').reshape(p, b, d)
  h_OWF = act(_bmatmul('pbd,pdf->pbf', x_OWD, w_gate_EDF[expert_O], dtype))
  if w_up_EDF is not None:
    h_OWF = h_OWF * _bmatmul('pbd,pdf->pbf', x_OWD, w_up_EDF[expert_O], dtype)
  y_OWD = _bmatmul('pbf,pfd->pbd', h_OWF, w_down_EFD[expert_O], dtype)
  return y_OWD.reshape(p * b, d).at[dest_Y].get(mode='fill', fill_value=0)


def capacity_slots(idx_IA, g: int, s: int, e: int, c: int):
  """GShard/Switch capacity for J groups (g) of Z tokens (s), C slots (c) per (group, expert).

  -> (slot [J, Y = k*Z] int32, kept fraction of token-slots). Token-slot m = j*Z + z is token z's
  j-th choice (choice-major: every first choice ranks before any second choice, and within a
  choice tokens rank by position, GShard Alg. 1). slot = (g*E + expert)*C + rank in that expert's
  buffer, or J*E*C (out of range) when the rank is >= C: the slot is dropped and the block's
  residual carries the token.
  """
  k = idx_IA.shape[-1]
  idx_JY = idx_IA.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
  mask_JYE = jax.nn.one_hot(idx_JY, e, dtype=jnp.int32)
  pos_JY = jnp.sum((jnp.cumsum(mask_JYE, axis=1) - 1) * mask_JYE, axis=-1)
  keep_JY = pos_JY < c
  slot_JY = (jnp.arange(g, dtype=jnp.int32)[:, None] * e + idx_JY) * c + pos_JY
  return jnp.where(keep_JY, slot_JY, g * e * c), jnp.mean(keep_JY.astype(jnp.float32))


def dispatch(x_JZD, slot_JY, e: int, c: int, dtype) -> jax.Array:
  """Token-slots into capacity buffers [J, E, C, D] (zeros where unfilled) by index: O(k*Z*D)
  data movement, where the one-hot einsum of Switch/GShard costs O(Z*E*C*D), quadratic in Z."""
  g, s, d = x_JZD.shape
  x_JYD = jnp.tile(x_JZD.astype(dtype), (1, slot_JY.shape[1] // s, 1))  # Slot j*Z + z -> token z.
  # A scatter-add (slots are distinct) transposes to a plain gather.
  buf = jnp.zeros((g * e * c, d), dtype).at[slot_JY.reshape(-1)].add(x_JYD.reshape(-1, d),
                                                                  mode='drop')
  return buf.reshape(g, e, c, d)


def combine(out_JECD, slot_JY, weights_IA) -> jax.Array:
  """Expert outputs back to tokens, weighted by the gates and summed over the k choices:
  [J, E, C, D] -> float32 [J, Z, D]; dropped slots contribute zero."""
  g, _, _, d = out_JECD.shape
  k = weights_IA.shape[-1]
  s = slot_JY.shape[1] // k
  out_JYD = out_JECD.reshape(-1, d).at[slot_JY].get(mode='fill', fill_value=0)
  w_JAZ = weights_IA.reshape(g, s, k).transpose(0, 2, 1).astype(jnp.float32)
  return jnp.einsum('gksd,gks->gsd', out_JYD.reshape(g, k, s, d).astype(jnp.float32), w_JAZ)

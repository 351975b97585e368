"""One description of which keys each query may see; every attention backend consumes it.

Shapes: B batch, T queries, S keys. A query at position q may see a key at position p when
  p <= q                                   (causal)
  and (window <= 0 or p > q - window)      (sliding window: the last `window` positions, incl. self)
  and q_segment == k_segment               (segment ids given: packed documents never mix)
  and slot < kv_lengths[b]                 (lengths given: per-row valid cache slots 0..len-1)
Positions are absolute token positions (RoPE's), so a packed row restarts them per document and
a cache row holds the key for position s in slot s.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Large negative instead of -inf so a fully masked row stays finite (never produced here).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """q_pos_BT [B, T] and k_pos_BS [B or 1, S] int positions; `window` a (possibly traced) int
  scalar, 0 = global; q_seg_BT / k_seg_BS optional segment ids (same leading shapes as the
  positions); kv_lengths_B optional per-row count of valid key slots."""
  q_pos_BT: jax.Array
  k_pos_BS: jax.Array
  window: jax.Array | int = 0
  q_seg_BT: jax.Array | None = None
  k_seg_BS: jax.Array | None = None
  kv_lengths_B: jax.Array | None = None

  @property
  def num_keys(self) -> int:
    return self.k_pos_BS.shape[-1]

  def allowed(self, k_start: int | jax.Array = 0, k_size: int | None = None) -> jax.Array:
    """Bool [B or 1, T, k_size]: which of keys k_start..k_start+k_size-1 each query sees."""
    s = self.num_keys
    k_size = s if k_size is None else k_size
    sl = lambda a: (a if (k_size == s and isinstance(k_start, int) and k_start == 0)
                    else jax.lax.dynamic_slice_in_dim(a, k_start, k_size, axis=1))
    k_pos_B1S, q_pos_BT1 = sl(self.k_pos_BS)[:, None, :], self.q_pos_BT[:, :, None]
    window = self.window
    ok_BTS = (k_pos_B1S <= q_pos_BT1) & ((window <= 0) | (k_pos_B1S > q_pos_BT1 - window))
    if self.q_seg_BT is not None:
      ok_BTS = ok_BTS & (sl(self.k_seg_BS)[:, None, :] == self.q_seg_BT[:, :, None])
    if self.kv_lengths_B is not None:
      slot_S = k_start + jnp.arange(k_size)
      ok_BTS = ok_BTS & (slot_S[None, None, :] < self.kv_lengths_B[:, None, None])
    return ok_BTS

  def padded(self, s: int) -> 'AttentionMask':
    """The same mask over S + pad keys where the extra keys are never visible."""
    pad = s - self.num_keys
    if pad == 0:
      return self
    big = jnp.iinfo(jnp.int32).max
    padk = lambda a, v: None if a is None else jnp.pad(a, ((0, 0), (0, pad)), constant_values=v)
    lengths = self.kv_lengths_B
    if lengths is None:
      lengths = jnp.full((self.q_pos_BT.shape[0],), self.num_keys, jnp.int32)
    return dataclasses.replace(self, k_pos_BS=padk(self.k_pos_BS, big),
                               k_seg_BS=padk(self.k_seg_BS, -1), kv_lengths_B=lengths)


def causal(positions_BT: jax.Array, window: jax.Array | int = 0,
           segment_ids_BT: jax.Array | None = None) -> AttentionMask:
  """Self-attention over one sequence (training / no cache): keys are the queries."""
  return AttentionMask(positions_BT, positions_BT, window, segment_ids_BT, segment_ids_BT)

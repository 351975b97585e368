"""Splash attention: the Pallas TPU kernel that ships with jax
(jax.experimental.pallas.ops.tpu.splash_attention), block-sparse FlashAttention with its own VJP
(fused dq/dk/dv backward kernel).

What the kernel expresses here: self-attention (T == S) per row, causal or a sliding window
(CausalMask / LocalMask), segment ids (packed documents), the logit soft-cap, grouped KV heads
(K | N), queries pre-scaled. T is padded to a multiple of the tile (128 <= tile <= `block`); the
padding is its own segment, so every padded query sees itself.

What it does not, and who does it instead:
- Its masks are over indices, not positions: query i may see key j <= i (and j > i - window).
  That equals AttentionMask's rule when q_pos == k_pos and positions step by one inside each
  segment (the training forward: 0..T-1, or restarting at each packed document, whose segment
  ids are contiguous runs). This is checked at run time; a mask that fails it runs 'flash'
  (lax.cond, so both are compiled).
- A static mask needs a Python-int window. A traced window (the model's scanned layer stack
  passes one per layer) runs splash's causal kernel when it is <= 0 (global layers) and 'flash'
  when it is > 0 (lax.cond): splash's dynamic dense-mask path would cost O(T * S) bytes.
- A KV cache (mask.kv_lengths_B: per-row lengths in cached decoding and chunked prefill), T != S,
  or segment ids on one side only: delegated to 'flash' at trace time.
- One device: the kernel is called as is; under a multi-device mesh it would need a shard_map
  (not done here).
Platform: TPU. Elsewhere only in Pallas's interpreter when asked (INTERPRET = True or
interpret=True: tests, tiny shapes, slow); otherwise it refuses in one line naming
config.model.attention_impl.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from model.attention_ops import flash
from model.attention_ops.mask import AttentionMask

BLOCK = 512        # Largest tile; the kernel needs multiples of 128.
INTERPRET = False  # Run in Pallas's interpreter off TPU (tests).
_PAD_SEGMENT = int(jnp.iinfo(jnp.int32).min)


def attend(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, softcap: float = 0.0,
           block: int | None = None, interpret: bool | None = None):
  """Softmax attention by the splash kernel where it applies, else by 'flash' (see above)."""
  interpret = INTERPRET if interpret is None else interpret
  block = block or BLOCK
  platform = jax.default_backend()
  if platform != 'tpu' and not interpret:
    raise ValueError(f"config.model.attention_impl='splash' is a TPU kernel; this run's platform "
                     f"is {platform!r}: use 'xla' or 'flash'")
  t, s = q_BTNH.shape[1], k_BSKH.shape[1]
  fallback = lambda q, k, v: flash.attend(q, k, v, mask, softcap)
  if (mask.kv_lengths_B is not None or t != s
      or (mask.q_seg_BT is None) != (mask.k_seg_BS is None)):
    return fallback(q_BTNH, k_BSKH, v_BSKH)
  window, use_splash = mask.window, _index_layout(mask)
  if isinstance(window, jax.core.Tracer):
    use_splash, window = use_splash & (window <= 0), 0
  window = int(window)
  kernel = lambda q, k, v: _splash(q, k, v, mask, softcap, window, block, interpret)
  return jax.lax.cond(use_splash, kernel, fallback, q_BTNH, k_BSKH, v_BSKH)


def _index_layout(mask: AttentionMask) -> jax.Array:
  """True when the index-based kernel mask equals the position-based one: q_pos == k_pos and
  positions step by one inside each segment (segments taken as contiguous runs)."""
  pos_BT = mask.q_pos_BT
  ok = jnp.all(pos_BT == mask.k_pos_BS)
  step_BT = pos_BT[:, 1:] - pos_BT[:, :-1] == 1
  if mask.q_seg_BT is not None:
    seg_BT = mask.q_seg_BT
    ok = ok & jnp.all(seg_BT == mask.k_seg_BS)
    step_BT = step_BT | (seg_BT[:, 1:] != seg_BT[:, :-1])
  return ok & jnp.all(step_BT)


def _splash(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, softcap: float, window: int,
            block: int, interpret: bool):
  b, t, n, h = q_BTNH.shape
  dtype = q_BTNH.dtype
  tile = min(max(128, block // 128 * 128), -(-t // 128) * 128)
  tp = -(-t // tile) * tile
  head_mask = (sa.LocalMask((tp, tp), (window - 1, 0), offset=0) if window > 0
               else sa.CausalMask((tp, tp)))
  sizes = sa.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                        block_kv_dkv=tile, block_kv_dkv_compute=tile, use_fused_bwd_kernel=True)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * n), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=float(softcap) or None, interpret=interpret)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).astype(dtype).swapaxes(1, 2)
  q_BNTH, k_BKSH, v_BKSH = pad(q_BTNH), pad(k_BSKH), pad(v_BSKH)
  if mask.q_seg_BT is not None:
    seg_BT = jnp.pad(mask.q_seg_BT.astype(jnp.int32), ((0, 0), (0, tp - t)),
                     constant_values=_PAD_SEGMENT)
  elif tp > t:
    seg_BT = jnp.broadcast_to((jnp.arange(tp) >= t).astype(jnp.int32), (b, tp))
  else:
    seg_BT = None
  if seg_BT is None:
    y_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  else:
    y_BNTH = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=sa.SegmentIds(seg, seg)))(
        q_BNTH, k_BKSH, v_BKSH, seg_BT)
  return y_BNTH[:, :, :t].swapaxes(1, 2).astype(dtype)

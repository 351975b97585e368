"""FlashAttention-2 in pure JAX (Dao 2023) with its own VJP.

Queries and keys are visited in tiles of `block` x `block` with an online softmax (running max and
sum per query). A `jax.custom_vjp` saves only q, k, v, the output and its float32 log-sum-exp
(plus the integer mask description); the backward pass visits the tiles again, recomputes each
tile's probabilities from the log-sum-exp and accumulates
  dv = p^T do,  dp = do v^T,  ds = p * (dp - rowsum(do * out)) [* (1 - tanh^2) with a soft-cap],
  dq += ds k,   dk = ds^T q.
So both passes hold O(T * block) floats, never a [T, S] array nor per-tile carries. Tiles in
which no query sees any key (above the causal diagonal, outside every sliding window, past every
row's kv_length) are skipped with lax.cond, which changes no result: such a tile contributes
exact zeros. Matches 'xla' to float32 rounding in outputs and gradients. A query that sees no key
at all gets 0 here (xla: the mean of v); the model never asks for one (a query sees itself).

Shapes: B batch, T queries, S keys, N = K * G heads, H head_dim; inside a tile T is the query
extent and C the key extent. Integer mask arrays get zero (float0) cotangents.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.attention_ops.mask import MASK_VALUE, AttentionMask

BLOCK = 512


def attend(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, softcap: float = 0.0,
           block: int | None = None):
  """Softmax attention over `block`-sized query and key tiles (default BLOCK, read at call
  time); queries arrive already scaled. -> y_BTNH in q's dtype (float32 softmax and sums)."""
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  dtype = q_BTNH.dtype
  block = block or BLOCK
  bq, bk = min(block, t), min(block, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  mask = _pad_queries(mask.padded(sp), tp)
  q_BTKGH = _pad(q_BTNH, tp).reshape(b, tp, kv, n // kv, h)
  y_BTKGH = _flash(q_BTKGH, _pad(k_BSKH.astype(dtype), sp), _pad(v_BSKH.astype(dtype), sp),
                   mask, float(softcap), bq, bk)
  return y_BTKGH[:, :t].reshape(b, t, n, h)


def _pad(x, size: int):
  """Zero-pads axis 1 of x to `size`."""
  pad = size - x.shape[1]
  return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _pad_queries(mask: AttentionMask, tp: int) -> AttentionMask:
  """Extra queries at position -1 see no key (positions are >= 0), so their tiles are skipped."""
  pad = tp - mask.q_pos_BT.shape[1]
  if pad == 0:
    return mask
  padq = lambda a: None if a is None else jnp.pad(a, ((0, 0), (0, pad)), constant_values=-1)
  return dataclasses.replace(mask, q_pos_BT=padq(mask.q_pos_BT), q_seg_BT=padq(mask.q_seg_BT))


def _rows(x, i, size: int, axis: int = 1):
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _tile_allowed(mask: AttentionMask, i, bq: int, j, bk: int):
  """Bool [B or 1, bq, bk]: which keys of key tile j the queries of query tile i see."""
  sub = dataclasses.replace(
      mask, q_pos_BT=_rows(mask.q_pos_BT, i, bq),
      q_seg_BT=None if mask.q_seg_BT is None else _rows(mask.q_seg_BT, i, bq))
  return sub.allowed(j * bk, bk)


def _logits(q_BTKGH, k_BCKH, softcap: float):
  """(capped logits, tanh(logits / softcap) or None), float32 [B, K, G, T, C]."""
  s_BKGTC = jnp.einsum('btkgh,bckh->bkgtc', q_BTKGH, k_BCKH, preferred_element_type=jnp.float32)
  if not softcap:
    return s_BKGTC, None
  tanh_BKGTC = jnp.tanh(s_BKGTC / softcap)
  return softcap * tanh_BKGTC, tanh_BKGTC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_BTKGH, k_BSKH, v_BSKH, mask, softcap, bq, bk):
  return _forward(q_BTKGH, k_BSKH, v_BSKH, mask, softcap, bq, bk)[0]


def _forward(q_BTKGH, k_BSKH, v_BSKH, mask, softcap, bq, bk):
  """-> (y_BTKGH in q's dtype, lse_BKGT float32 log-sum-exp of each query's logits)."""
  b, tp, kv, g, h = q_BTKGH.shape
  nq, nk = tp // bq, k_BSKH.shape[1] // bk
  dtype = q_BTKGH.dtype

  def q_tile(_, i):
    q_tile_BTKGH = _rows(q_BTKGH, i, bq)

    def k_tile(carry, j):
      def visit(carry, ok_BTC):
        m_BKGT, l_BKGT, acc_BKGTH = carry
        s_BKGTC, _ = _logits(q_tile_BTKGH, _rows(k_BSKH, j, bk), softcap)
        ok_B11TC = ok_BTC[:, None, None]
        m_new = jnp.maximum(m_BKGT, jnp.where(ok_B11TC, s_BKGTC, MASK_VALUE).max(-1))
        p_BKGTC = jnp.where(ok_B11TC, jnp.exp(s_BKGTC - m_new[..., None]), 0.0)
        alpha_BKGT = jnp.exp(m_BKGT - m_new)
        pv_BKGTH = jnp.einsum('bkgtc,bckh->bkgth', p_BKGTC.astype(dtype), _rows(v_BSKH, j, bk),
                              preferred_element_type=jnp.float32)
        return (m_new, alpha_BKGT * l_BKGT + p_BKGTC.sum(-1),
                alpha_BKGT[..., None] * acc_BKGTH + pv_BKGTH)

      ok_BTC = _tile_allowed(mask, i, bq, j, bk)
      return jax.lax.cond(ok_BTC.any(), visit, lambda c, _: c, carry, ok_BTC), None

    init = (jnp.full((b, kv, g, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kv, g, bq), jnp.float32), jnp.zeros((b, kv, g, bq, h), jnp.float32))
    (m_BKGT, l_BKGT, acc_BKGTH), _ = jax.lax.scan(k_tile, init, jnp.arange(nk))
    l_BKGT = jnp.where(l_BKGT == 0, 1.0, l_BKGT)  # A query that sees nothing: y = 0.
    y_BTKGH = jnp.einsum('bkgth->btkgh', acc_BKGTH / l_BKGT[..., None]).astype(dtype)
    return None, (y_BTKGH, m_BKGT + jnp.log(l_BKGT))

  _, (y_nBTKGH, lse_nBKGT) = jax.lax.scan(q_tile, None, jnp.arange(nq))
  y_BTKGH = jnp.moveaxis(y_nBTKGH, 0, 1).reshape(b, tp, kv, g, h)
  lse_BKGT = jnp.moveaxis(lse_nBKGT, 0, 3).reshape(b, kv, g, tp)
  return y_BTKGH, lse_BKGT


def _flash_fwd(q_BTKGH, k_BSKH, v_BSKH, mask, softcap, bq, bk):
  y_BTKGH, lse_BKGT = _forward(q_BTKGH, k_BSKH, v_BSKH, mask, softcap, bq, bk)
  return y_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, mask, y_BTKGH, lse_BKGT)


def _flash_bwd(softcap, bq, bk, res, dy_BTKGH):
  q_BTKGH, k_BSKH, v_BSKH, mask, y_BTKGH, lse_BKGT = res
  b, tp, kv, g, h = q_BTKGH.shape
  sp = k_BSKH.shape[1]
  nq, nk = tp // bq, sp // bk
  dtype = q_BTKGH.dtype
  dy_BTKGH = dy_BTKGH.astype(dtype)
  # rowsum(do * out): the softmax's correction term, one float per query.
  di_BKGT = jnp.einsum('btkgh,btkgh->bkgt', dy_BTKGH.astype(jnp.float32),
                       y_BTKGH.astype(jnp.float32))

  def k_tile(dq_BTKGH, j):
    k_BCKH, v_BCKH = _rows(k_BSKH, j, bk), _rows(v_BSKH, j, bk)

    def q_tile(carry, i):
      def visit(ok_BTC):
        q_tile_BTKGH, dy_tile_BTKGH = _rows(q_BTKGH, i, bq), _rows(dy_BTKGH, i, bq)
        s_BKGTC, tanh_BKGTC = _logits(q_tile_BTKGH, k_BCKH, softcap)
        p_BKGTC = jnp.where(ok_BTC[:, None, None],
                            jnp.exp(s_BKGTC - _rows(lse_BKGT, i, bq, 3)[..., None]), 0.0)
        dv_BCKH = jnp.einsum('bkgtc,btkgh->bckh', p_BKGTC.astype(dtype), dy_tile_BTKGH,
                             preferred_element_type=jnp.float32)
        dp_BKGTC = jnp.einsum('btkgh,bckh->bkgtc', dy_tile_BTKGH, v_BCKH,
                              preferred_element_type=jnp.float32)
        ds_BKGTC = p_BKGTC * (dp_BKGTC - _rows(di_BKGT, i, bq, 3)[..., None])
        if softcap:
          ds_BKGTC = ds_BKGTC * (1.0 - tanh_BKGTC * tanh_BKGTC)
        ds_BKGTC = ds_BKGTC.astype(dtype)
        dq_tile = jnp.einsum('bkgtc,bckh->btkgh', ds_BKGTC, k_BCKH,
                             preferred_element_type=jnp.float32)
        dk_BCKH = jnp.einsum('bkgtc,btkgh->bckh', ds_BKGTC, q_tile_BTKGH,
                             preferred_element_type=jnp.float32)
        return dq_tile, dk_BCKH, dv_BCKH

      def skip(_):
        return (jnp.zeros((b, bq, kv, g, h), jnp.float32),
                jnp.zeros((b, bk, kv, h), jnp.float32), jnp.zeros((b, bk, kv, h), jnp.float32))

      dq_BTKGH, dk_BCKH, dv_BCKH = carry
      ok_BTC = _tile_allowed(mask, i, bq, j, bk)
      dq_tile, dk_tile, dv_tile = jax.lax.cond(ok_BTC.any(), visit, skip, ok_BTC)
      dq_BTKGH = jax.lax.dynamic_update_slice_in_dim(
          dq_BTKGH, _rows(dq_BTKGH, i, bq) + dq_tile, i * bq, axis=1)
      return (dq_BTKGH, dk_BCKH + dk_tile, dv_BCKH + dv_tile), None

    zeros_BCKH = jnp.zeros((b, bk, kv, h), jnp.float32)
    (dq_BTKGH, dk_BCKH, dv_BCKH), _ = jax.lax.scan(
        q_tile, (dq_BTKGH, zeros_BCKH, zeros_BCKH), jnp.arange(nq))
    return dq_BTKGH, (dk_BCKH, dv_BCKH)

  dq_BTKGH, (dk_nBCKH, dv_nBCKH) = jax.lax.scan(
      k_tile, jnp.zeros((b, tp, kv, g, h), jnp.float32), jnp.arange(nk))
  unblock = lambda x_nBCKH: jnp.moveaxis(x_nBCKH, 0, 1).reshape(b, sp, kv, h)
  return (dq_BTKGH.astype(dtype), unblock(dk_nBCKH).astype(k_BSKH.dtype),
          unblock(dv_nBCKH).astype(v_BSKH.dtype), jax.tree.map(_no_cotangent, mask))


def _no_cotangent(x):
  """The zero cotangent of an integer (mask) input."""
  return np.zeros(np.shape(x), jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)

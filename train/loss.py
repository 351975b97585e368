"""Next-token cross-entropy with optional z-loss, in float32, with per-token weights.

Two ways to the same numbers: `cross_entropy` from materialised logits [B, T, V] (any objective
that needs logits), and `fused_cross_entropy`, which takes the final hidden states and the output
weight, visits the sequence in chunks and never holds float32 [B, T, V] logits. Under `jax.grad`
it computes its gradients in the forward pass (the loss is a weighted sum, so the cotangent of
every logit is known there: softmax - onehot, scaled), keeping 3 matmuls per chunk instead of
the 4 a recomputing backward needs (the trick of Liger-Kernel's fused linear cross-entropy,
Hsu et al. 2024). At 32k vocabulary the head is most of a small model's FLOPs and memory traffic.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None = None,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Weighted mean of -log p(target), plus z_loss * log(Z)^2 (PaLM §5 uses 1e-4) to keep the
  softmax normaliser near 1. Returns (total_loss, {'loss': ce, 'z_loss': ..., 'weight': sum w})."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  if weights_BT is None:
    weights_BT = jnp.ones(targets_BT.shape, jnp.float32)
  # An unweighted target may be no vocabulary id (a soft prompt's virtual token); out-of-range
  # gathers give NaN, and 0 * NaN would still poison the sum.
  targets_BT = jnp.where(weights_BT > 0, targets_BT, 0)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  denom = jnp.maximum(weights_BT.sum(), 1.0)
  ce = (nll_BT * weights_BT).sum() / denom
  zl = (jnp.square(log_z_BT) * weights_BT).sum() / denom
  return ce + z_loss * zl, {'loss': ce, 'z_loss': zl, 'weight': weights_BT.sum()}


def chunk_length(t: int, batch: int, chunk_tokens: int) -> int:
  """The largest divisor of T whose chunks hold at most `chunk_tokens` tokens (at least 1)."""
  want = max(1, chunk_tokens // max(batch, 1))
  return max(c for c in range(1, t + 1) if t % c == 0 and c <= want) if want < t else t


def fused_cross_entropy(x_BTD: jax.Array, w_VD: jax.Array, targets_BT: jax.Array,
                        weights_BT: jax.Array | None = None, z_loss: float = 0.0,
                        softcap: float = 0.0, dtype=jnp.float32,
                        chunk_tokens: int = 2048) -> tuple[jax.Array, dict]:
  """`cross_entropy(softcap(x_BTD @ w_VD^T), ...)` without the [B, T, V] logits: the matmul runs
  in `dtype` with float32 accumulation like the model's output projection, the softmax in
  float32. Chunks of the sequence hold about `chunk_tokens` tokens. Only the returned total is
  differentiable (the metrics are not)."""
  b, t, _ = x_BTD.shape
  if weights_BT is None:
    weights_BT = jnp.ones(targets_BT.shape, jnp.float32)
  weights_BT = weights_BT.astype(jnp.float32)
  targets_BT = jnp.where(weights_BT > 0, targets_BT, 0)   # As in cross_entropy.
  denom = jnp.maximum(weights_BT.sum(), 1.0)
  tc = chunk_length(t, b, chunk_tokens)
  total, (ce, zl) = _head_loss(x_BTD, w_VD, targets_BT, weights_BT / denom, float(z_loss),
                               float(softcap), jnp.dtype(dtype).name, tc)
  ce, zl = jax.lax.stop_gradient(ce), jax.lax.stop_gradient(zl)
  return total, {'loss': ce, 'z_loss': zl, 'weight': weights_BT.sum()}


def _chunks(a, tc):
  """[B, T, ...] -> [T / tc, B, tc, ...]"""
  b, t = a.shape[:2]
  return jnp.swapaxes(a.reshape(b, t // tc, tc, *a.shape[2:]), 0, 1)


def _scan(x_BTD, w_VD, targets_BT, coef_BT, z_loss, softcap, dtype, tc, with_grads):
  """Sum over chunks of coef * (nll + z_loss * log_z^2); with grads also d/dx [B, T, D] and
  d/dw [V, D] of that sum (float32)."""
  dt = jnp.dtype(dtype)
  w_c = w_VD.astype(dt)

  def chunk(dw_VD, xs):
    x_BtD, tgt_Bt, coef_Bt = xs
    x_BtD = x_BtD.astype(dt)
    logits_BtV = jnp.einsum('btd,vd->btv', x_BtD, w_c, preferred_element_type=jnp.float32)
    logits_BtV = logits_BtV.astype(dt).astype(jnp.float32)  # The model's decode rounds here too.
    if softcap:
      tanh_BtV = jnp.tanh(logits_BtV / softcap)
      logits_BtV = softcap * tanh_BtV
    log_z_Bt = jax.nn.logsumexp(logits_BtV, axis=-1)
    target_Bt = jnp.take_along_axis(logits_BtV, tgt_Bt[..., None], axis=-1)[..., 0]
    sums = (jnp.sum(coef_Bt * (log_z_Bt - target_Bt)), jnp.sum(coef_Bt * jnp.square(log_z_Bt)))
    if not with_grads:
      return dw_VD, (sums, None)
    # d/dlogit of coef * (log_z - logit_target + z_loss * log_z^2).
    scale_Bt = coef_Bt * (1.0 + 2.0 * z_loss * log_z_Bt)
    onehot_BtV = jax.lax.broadcasted_iota(jnp.int32, logits_BtV.shape, 2) == tgt_Bt[..., None]
    g_BtV = (jnp.exp(logits_BtV - log_z_Bt[..., None]) * scale_Bt[..., None]
             - jnp.where(onehot_BtV, coef_Bt[..., None], 0.0))
    if softcap:
      g_BtV = g_BtV * (1.0 - jnp.square(tanh_BtV))
    # Ask for g in its natural [B, t, V] layout. XLA:CPU (jax 0.10) still recomputes it inside
    # the transpose the dW matmul wants (strided reads), which is why this path is opt-in there.
    g_BtV = jax.lax.optimization_barrier(g_BtV.astype(dt))
    dx_BtD = jnp.einsum('btv,vd->btd', g_BtV, w_c, preferred_element_type=jnp.float32)
    dw_VD = dw_VD + jnp.einsum('btv,btd->vd', g_BtV, x_BtD, preferred_element_type=jnp.float32)
    return dw_VD, (sums, dx_BtD)

  dw0 = jnp.zeros(w_VD.shape, jnp.float32) if with_grads else None
  xs = (_chunks(x_BTD, tc), _chunks(targets_BT, tc), _chunks(coef_BT, tc))
  dw_VD, ((ce_n, zl_n), dx_nBtD) = jax.lax.scan(chunk, dw0, xs)
  ce, zl = ce_n.sum(), zl_n.sum()
  dx_BTD = None
  if with_grads:
    dx_BTD = jnp.swapaxes(dx_nBtD, 0, 1).reshape(x_BTD.shape)
  return ce + z_loss * zl, (ce, zl), (dx_BTD, dw_VD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_loss(x_BTD, w_VD, targets_BT, coef_BT, z_loss, softcap, dtype, tc):
  total, stats, _ = _scan(x_BTD, w_VD, targets_BT, coef_BT, z_loss, softcap, dtype, tc, False)
  return total, stats


def _head_loss_fwd(x_BTD, w_VD, targets_BT, coef_BT, z_loss, softcap, dtype, tc):
  total, stats, (dx_BTD, dw_VD) = _scan(x_BTD, w_VD, targets_BT, coef_BT, z_loss, softcap,
                                        dtype, tc, True)
  return (total, stats), (dx_BTD.astype(x_BTD.dtype), dw_VD.astype(w_VD.dtype), targets_BT,
                          coef_BT)


def _head_loss_bwd(z_loss, softcap, dtype, tc, res, g):
  dx_BTD, dw_VD, targets_BT, coef_BT = res
  g_total = g[0]  # The metrics' cotangents are zero: fused_cross_entropy stops their gradient.
  return (g_total.astype(dx_BTD.dtype) * dx_BTD, g_total.astype(dw_VD.dtype) * dw_VD,
          np.zeros(targets_BT.shape, jax.dtypes.float0), jnp.zeros_like(coef_BT))


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)

"""Sparse mixture-of-experts FFN: router, capacity / dropless dispatch, expert MLPs, aux losses.

Shapes: B batch, T length, D d_model, E experts, F expert mlp dim, k top-k, N tokens (B*T),
G capacity groups, S tokens per group, C expert capacity per group, M token-slots (N*k).

References:
- Switch Transformer (Fedus et al. 2022, §2.1-2.4): capacity, load-balancing loss
  coef * E * sum_i f_i P_i, router in float32.
- GShard (Lepikhin et al. 2020, Alg. 1): top-2, per-group capacity, first choices get capacity
  before second choices.
- ST-MoE (Zoph et al. 2022, §3): router z-loss coef * mean(logsumexp(logits)^2).
- Mixtral (Jiang et al. 2024, §2.1): softmax over the kept top-k logits only.
- DeepSeek-V3 (2024, §2.1): sigmoid scores, top-k on score + bias, weights = scores renormalised
  over the selected experts (bias excluded); aux-loss-free bias update.
- MegaBlocks (Gale et al. 2022): dropless grouped matmuls (here `jax.lax.ragged_dot`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model import sharding
from model.config import GATINGS, MoEConfig, ModelConfig  # noqa: F401  (re-exported)
from model.layers import _ACTIVATION_FNS, MLP, matmul, param

def update_router_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free balancing: b_i -= rate if expert i is overloaded (load above the
  mean), += rate if underloaded, unchanged at the mean. Called once per step, outside the grad."""
  load_E = jnp.asarray(load_E, jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def _bmatmul(eq: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """`layers.matmul` for the expert-batched einsums. XLA:CPU (jax 0.10.2) has no DotThunk for some
  batched bf16 x bf16 -> f32 dots ("Unsupported element type"), so on CPU those run in float32."""
  if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == 'cpu':
    return jnp.einsum(eq, x.astype(jnp.float32), w.astype(jnp.float32)).astype(dtype)
  return matmul(eq, x, w, dtype)


class RouterBias(nnx.Variable):
  """Non-trainable per-expert routing bias (DeepSeek-V3); excluded from `nnx.Param` state."""


def route(logits_NE: jax.Array, bias_E: jax.Array, moe_cfg: MoEConfig):
  """Gating. float32 logits [N, E] -> (expert_idx [N, k] int32, weights [N, k], probs [N, E]).

  The bias only changes which experts are selected, never the weights (DeepSeek-V3). `probs` is
  the per-token distribution over all experts used by the balance loss and entropy.
  """
  k = moe_cfg.top_k
  if moe_cfg.gating == 'sigmoid':
    scores_NE = jax.nn.sigmoid(logits_NE)
    _, idx_NK = jax.lax.top_k(scores_NE + bias_E, k)
    sel_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
    weights_NK = sel_NK / jnp.sum(sel_NK, axis=-1, keepdims=True)
    probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
  elif moe_cfg.gating == 'topk_softmax':
    _, idx_NK = jax.lax.top_k(logits_NE + bias_E, k)
    weights_NK = jax.nn.softmax(jnp.take_along_axis(logits_NE, idx_NK, axis=-1), axis=-1)
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  else:  # softmax_topk
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    _, idx_NK = jax.lax.top_k(probs_NE + bias_E, k)
    weights_NK = jnp.take_along_axis(probs_NE, idx_NK, axis=-1)
    if moe_cfg.renormalize:
      weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
  return idx_NK.astype(jnp.int32), weights_NK, probs_NE


class MoE(nnx.Module):
  """Top-k routed expert FFNs (+ optional shared experts). [B,T,D] -> ([B,T,D], aux dict).

  aux: aux_loss, router_z_loss (already multiplied by their coefs; add them to the LM loss),
  load [E] (fraction of token-slots routed to each expert, before dropping), dropped_fraction,
  router_entropy (mean per-token entropy of `probs`, nats).
  """

  def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, rngs: nnx.Rngs):
    moe_cfg.validate()
    self.cfg = cfg
    self.moe_cfg = moe_cfg
    pdt = jnp.dtype(cfg.param_dtype)
    d, e, f = cfg.d_model, moe_cfg.num_experts, moe_cfg.expert_mlp_dim
    router_init = nnx.initializers.variance_scaling(
        moe_cfg.router_init_scale, 'fan_in', 'truncated_normal', in_axis=0, out_axis=-1)
    # The router stays float32 whatever param_dtype is: routing decisions are precision-sensitive
    # (Switch "selective precision").
    self.router = param(rngs, router_init, (d, e), ('embed', 'expert'), jnp.float32)
    self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32))
    # Each expert's kernel is [D, F] with fan-in D (or F), stacked on a leading E axis: E must be
    # a batch axis for the variance scaling, not part of the fan-in.
    expert_init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=1,
                                                    out_axis=-1, batch_axis=(0,))
    self.w_gate = param(rngs, expert_init, (e, d, f), ('expert', 'embed', 'mlp'), pdt)
    if cfg.gated:
      self.w_up = param(rngs, expert_init, (e, d, f), ('expert', 'embed', 'mlp'), pdt)
    self.w_down = param(rngs, expert_init, (e, f, d), ('expert', 'mlp', 'embed'), pdt)
    if moe_cfg.num_shared_experts:
      # k_s always-on experts of width F == one dense MLP of width k_s * F (DeepSeekMoE).
      shared_cfg = dataclasses.replace(cfg, mlp_dim=moe_cfg.num_shared_experts * f)
      self.shared = MLP(shared_cfg, rngs)

  # ---- Expert FFNs ----------------------------------------------------------------------------

  def _experts_dense(self, x_GECD: jax.Array) -> jax.Array:
    """Per-expert FFN on capacity buffers [G, E, C, D] -> [G, E, C, D]."""
    dtype = jnp.dtype(self.cfg.dtype)
    act = _ACTIVATION_FNS[self.cfg.activation]
    h_GECF = act(_bmatmul('gecd,edf->gecf', x_GECD, self.w_gate[...], dtype))
    if self.cfg.gated:
      h_GECF = h_GECF * _bmatmul('gecd,edf->gecf', x_GECD, self.w_up[...], dtype)
    return _bmatmul('gecf,efd->gecd', h_GECF, self.w_down[...], dtype)

  def _experts_ragged(self, x_MD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Per-expert FFN on expert-sorted token-slots [M, D] -> [M, D] (grouped matmul)."""
    dtype = jnp.dtype(self.cfg.dtype)
    act = _ACTIVATION_FNS[self.cfg.activation]

    def rdot(a, w):  # float32 accumulation, as in layers.matmul.
      return jax.lax.ragged_dot(a.astype(dtype), w.astype(dtype), group_sizes_E,
                                preferred_element_type=jnp.float32).astype(dtype)

    h_MF = act(rdot(x_MD, self.w_gate[...]))
    if self.cfg.gated:
      h_MF = h_MF * rdot(x_MD, self.w_up[...])
    return rdot(h_MF, self.w_down[...])

  # ---- Dispatch -------------------------------------------------------------------------------

  def _capacity(self, x_ND, idx_NK, weights_NK, b, t):
    """One-hot dispatch/combine with a fixed capacity per group (Switch/GShard)."""
    mc = self.moe_cfg
    e, k = mc.num_experts, mc.top_k
    g = b if mc.capacity_group == 'sequence' else 1
    s = (b * t) // g
    c = mc.capacity(s)
    dtype = jnp.dtype(self.cfg.dtype)
    # Choice-major slot order [G, k*S]: every first choice ranks before any second choice, and
    # within a choice tokens rank by position (GShard Alg. 1).
    idx_GM = idx_NK.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
    w_GM = weights_NK.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
    mask_GME = jax.nn.one_hot(idx_GM, e, dtype=jnp.int32)
    pos_GM = jnp.sum((jnp.cumsum(mask_GME, axis=1) - 1) * mask_GME, axis=-1)
    keep_GM = pos_GM < c   # Overflow slots are dropped; the block's residual carries them.
    # [G, M, E, C] one-hot of (expert, slot in its buffer); all-zero for dropped slots.
    disp_GMEC = (mask_GME.astype(jnp.float32)[..., None]
                 * jax.nn.one_hot(jnp.where(keep_GM, pos_GM, c), c, dtype=jnp.float32)[:, :, None, :])
    # Back to token order and sum the k choices (a token never picks one expert twice).
    disp_GSKEC = disp_GMEC.reshape(g, k, s, e, c).transpose(0, 2, 1, 3, 4)
    w_GSK = w_GM.reshape(g, k, s).transpose(0, 2, 1)
    dispatch_GSEC = jnp.sum(disp_GSKEC, axis=2)
    combine_GSEC = jnp.einsum('gskec,gsk->gsec', disp_GSKEC, w_GSK.astype(jnp.float32))
    x_GSD = x_ND.reshape(g, s, -1)
    x_GECD = _bmatmul('gsec,gsd->gecd', dispatch_GSEC, x_GSD, dtype)
    out_GECD = self._experts_dense(x_GECD)
    y_GSD = jnp.einsum('gsec,gecd->gsd', combine_GSEC, out_GECD.astype(jnp.float32))
    dropped = 1.0 - jnp.mean(keep_GM.astype(jnp.float32))
    return y_GSD.reshape(b * t, -1), dropped

  def _dropless(self, x_ND, idx_NK, weights_NK):
    """Sort token-slots by expert, grouped matmul, unsort, weighted sum over k (MegaBlocks)."""
    e, k = self.moe_cfg.num_experts, self.moe_cfg.top_k
    expert_M = idx_NK.reshape(-1)                 # slot m = n*k + j
    order_M = jnp.argsort(expert_M, stable=True)  # sorted position -> slot
    x_sorted_MD = jnp.take(x_ND, order_M // k, axis=0)
    group_sizes_E = jnp.bincount(expert_M, length=e).astype(jnp.int32)
    out_sorted_MD = self._experts_ragged(x_sorted_MD, group_sizes_E)
    out_MD = jnp.zeros_like(out_sorted_MD).at[order_M].set(out_sorted_MD)
    out_NKD = out_MD.reshape(x_ND.shape[0], k, -1).astype(jnp.float32)
    y_ND = jnp.einsum('nkd,nk->nd', out_NKD, weights_NK.astype(jnp.float32))
    return y_ND, jnp.zeros((), jnp.float32)

  # ---- Forward --------------------------------------------------------------------------------

  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    mc = self.moe_cfg
    dtype = jnp.dtype(self.cfg.dtype)
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    # Router in float32 (Switch selective precision).
    logits_NE = jnp.einsum('nd,de->ne', x_ND.astype(jnp.float32), self.router[...])
    idx_NK, weights_NK, probs_NE = route(logits_NE, self.router_bias[...], mc)

    if mc.dispatch == 'dropless':
      y_ND, dropped = self._dropless(x_ND, idx_NK, weights_NK)
    else:
      y_ND, dropped = self._capacity(x_ND, idx_NK, weights_NK, b, t)
    y_BTD = y_ND.reshape(b, t, d).astype(dtype)
    if mc.num_shared_experts:
      y_BTD = y_BTD + self.shared(x_BTD)
    y_BTD = sharding.constrain(y_BTD, ('batch', 'length', 'act_embed'))

    # Load before dropping: f_i = fraction of token-slots whose router choice is i (integer, so
    # no gradient); P_i = mean router probability. Switch: coef * E * sum f_i P_i (= coef when
    # uniform).
    load_E = jnp.mean(jax.nn.one_hot(idx_NK, mc.num_experts, dtype=jnp.float32), axis=(0, 1))
    mean_prob_E = jnp.mean(probs_NE, axis=0)
    aux_loss = mc.aux_loss_coef * mc.num_experts * jnp.sum(load_E * mean_prob_E)
    z_loss = mc.router_z_loss_coef * jnp.mean(jax.nn.logsumexp(logits_NE, axis=-1) ** 2)
    entropy = -jnp.mean(jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-30)), axis=-1))
    aux = dict(aux_loss=aux_loss, router_z_loss=z_loss, load=load_E,
               dropped_fraction=dropped, router_entropy=entropy)
    return y_BTD, aux

  def update_bias(self, load_E: jax.Array) -> None:
    """Applies `update_router_bias` with this layer's rate (call after the optimizer step)."""
    self.router_bias[...] = update_router_bias(self.router_bias[...], load_E,
                                               self.moe_cfg.bias_update_rate)

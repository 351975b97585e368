"""Sparse mixture-of-experts FFN: router, capacity / dropless dispatch, expert MLPs, aux losses.

Shapes: B batch, T length, D d_model, E experts, F expert mlp dim, A top-k choices per token
(k of them), I tokens (B*T), J capacity groups, Z tokens per group, C expert capacity per group,
Y token-slots (I*k). Letters other modules use for something else (attention's N heads, K kv
heads, G queries per kv head, S key length; RoPE's h) are not used here. The dispatch kernels live
in `model.moe_kernels` (re-exported here).

References:
- Switch Transformer (Fedus et al. 2022, §2.1-2.4): capacity, load-balancing loss
  coef * E * sum_i f_i P_i, router in float32.
- GShard (Lepikhin et al. 2020, Alg. 1): top-2, per-group capacity, first choices get capacity
  before second choices.
- ST-MoE (Zoph et al. 2022, §3): router z-loss coef * mean(logsumexp(logits)^2).
- Mixtral (Jiang et al. 2024, §2.1): softmax over the kept top-k logits only.
- DeepSeek-V3 (2024, §2.1): sigmoid scores, top-k on score + bias, weights = scores renormalised
  over the selected experts (bias excluded); aux-loss-free bias update.
- MegaBlocks (Gale et al. 2022): dropless grouped matmuls (`jax.lax.ragged_dot`; on CPU a
  block-padded batched matmul, since XLA:CPU runs ragged_dot densely for every group).

Under a mesh whose `expert` rule names an axis of size > 1 the routed experts run expert-parallel
(`model.moe_parallel`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model import moe_parallel, sharding
from model.config import GATINGS, MoEConfig, ModelConfig  # noqa: F401  (re-exported)
from model.layers import MLP, param
from model.moe_kernels import (  # noqa: F401  (re-exported: the kernels were defined here)
    GMM_BLOCK, capacity_slots, combine, dispatch, experts_dense, experts_ragged,
    native_grouped_matmul)


def update_router_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free balancing: b_i -= rate if expert i is overloaded (load above the
  mean), += rate if underloaded, unchanged at the mean. Called once per step, outside the grad."""
  load_E = jnp.asarray(load_E, jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


class RouterBias(nnx.Variable):
  """Non-trainable per-expert routing bias (DeepSeek-V3); excluded from `nnx.Param` state."""


def route(logits_IE: jax.Array, bias_E: jax.Array, moe_cfg: MoEConfig):
  """Gating. float32 logits [I, E] -> (expert_idx [I, A] int32, weights [I, A], probs [I, E]).

  The bias only changes which experts are selected, never the weights (DeepSeek-V3); the weights
  are multiplied by `routed_scaling_factor`. `probs` is the per-token distribution over all
  experts used by the balance loss and entropy.
  """
  k = moe_cfg.top_k
  if moe_cfg.gating == 'sigmoid':
    scores_IE = jax.nn.sigmoid(logits_IE)
    _, idx_IA = jax.lax.top_k(scores_IE + bias_E, k)
    sel_IA = jnp.take_along_axis(scores_IE, idx_IA, axis=-1)
    weights_IA = sel_IA / jnp.sum(sel_IA, axis=-1, keepdims=True)
    probs_IE = scores_IE / jnp.sum(scores_IE, axis=-1, keepdims=True)
  elif moe_cfg.gating == 'topk_softmax':
    _, idx_IA = jax.lax.top_k(logits_IE + bias_E, k)
    weights_IA = jax.nn.softmax(jnp.take_along_axis(logits_IE, idx_IA, axis=-1), axis=-1)
    probs_IE = jax.nn.softmax(logits_IE, axis=-1)
  else:  # softmax_topk
    probs_IE = jax.nn.softmax(logits_IE, axis=-1)
    _, idx_IA = jax.lax.top_k(probs_IE + bias_E, k)
    weights_IA = jnp.take_along_axis(probs_IE, idx_IA, axis=-1)
    if moe_cfg.renormalize:
      weights_IA = weights_IA / jnp.sum(weights_IA, axis=-1, keepdims=True)
  return idx_IA.astype(jnp.int32), weights_IA * moe_cfg.routed_scaling_factor, probs_IE


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

  # ---- Dispatch -------------------------------------------------------------------------------

  def expert_weights(self) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """(w_gate [E,D,F], w_up [E,D,F] or None, w_down [E,F,D])."""
    return (self.w_gate[...], self.w_up[...] if self.cfg.gated else None, self.w_down[...])

  def _capacity(self, x_ID, idx_IA, weights_IA, b, t):
    """Fixed-capacity expert buffers per group (Switch/GShard)."""
    mc = self.moe_cfg
    g = b if mc.capacity_group == 'sequence' else 1
    s = (b * t) // g
    e, c = mc.num_experts, mc.capacity(s)
    slot_JY, kept = capacity_slots(idx_IA, g, s, e, c)
    x_JECD = dispatch(x_ID.reshape(g, s, -1), slot_JY, e, c, jnp.dtype(self.cfg.dtype))
    out_JECD = experts_dense(self.cfg, x_JECD, *self.expert_weights())
    return combine(out_JECD, slot_JY, weights_IA).reshape(b * t, -1), 1.0 - kept

  def _dropless(self, x_ID, idx_IA, weights_IA):
    """Sort token-slots by expert, grouped matmul, unsort, weighted sum over k (MegaBlocks)."""
    e, k = self.moe_cfg.num_experts, self.moe_cfg.top_k
    expert_Y = idx_IA.reshape(-1)                 # slot m = i*k + j
    order_Y = jnp.argsort(expert_Y, stable=True)  # sorted position -> slot
    x_sorted_YD = jnp.take(x_ID, order_Y // k, axis=0)
    group_sizes_E = jnp.bincount(expert_Y, length=e).astype(jnp.int32)
    out_sorted_YD = experts_ragged(self.cfg, x_sorted_YD, group_sizes_E, *self.expert_weights())
    out_YD = jnp.zeros_like(out_sorted_YD).at[order_Y].add(out_sorted_YD)  # Unsort (a permutation).
    out_IAD = out_YD.reshape(x_ID.shape[0], k, -1).astype(jnp.float32)
    y_ID = jnp.einsum('nkd,nk->nd', out_IAD, weights_IA.astype(jnp.float32))
    return y_ID, jnp.zeros((), jnp.float32)

  # ---- Forward --------------------------------------------------------------------------------

  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    mc = self.moe_cfg
    dtype = jnp.dtype(self.cfg.dtype)
    b, t, d = x_BTD.shape
    x_ID = x_BTD.reshape(b * t, d)
    # Router in float32 (Switch selective precision).
    logits_IE = jnp.einsum('nd,de->ne', x_ID.astype(jnp.float32), self.router[...])
    idx_IA, weights_IA, probs_IE = route(logits_IE, self.router_bias[...], mc)

    ep = moe_parallel.active_plan(mc, b, t)
    if ep is not None:  # Experts split over a mesh axis; tokens travel by all-to-all.
      y_BTD, dropped = moe_parallel.expert_parallel_ffn(
          self.cfg, mc, ep, x_BTD, idx_IA.reshape(b, t, -1), weights_IA.reshape(b, t, -1),
          self.expert_weights())
      y_ID = y_BTD.reshape(b * t, d)
    elif mc.dispatch == 'dropless':
      y_ID, dropped = self._dropless(x_ID, idx_IA, weights_IA)
    else:
      y_ID, dropped = self._capacity(x_ID, idx_IA, weights_IA, b, t)
    y_BTD = y_ID.reshape(b, t, d).astype(dtype)
    if mc.num_shared_experts:
      y_BTD = y_BTD + self.shared(x_BTD)
    y_BTD = sharding.constrain(y_BTD, ('batch', 'length', 'act_embed'))

    # Load before dropping: f_i = fraction of token-slots whose router choice is i (integer, so
    # no gradient); P_i = mean router probability. Switch: coef * E * sum f_i P_i (= coef when
    # uniform).
    load_E = jnp.mean(jax.nn.one_hot(idx_IA, mc.num_experts, dtype=jnp.float32), axis=(0, 1))
    mean_prob_E = jnp.mean(probs_IE, axis=0)
    aux_loss = mc.aux_loss_coef * mc.num_experts * jnp.sum(load_E * mean_prob_E)
    z_loss = mc.router_z_loss_coef * jnp.mean(jax.nn.logsumexp(logits_IE, axis=-1) ** 2)
    entropy = -jnp.mean(jnp.sum(probs_IE * jnp.log(jnp.maximum(probs_IE, 1e-30)), axis=-1))
    aux = dict(aux_loss=aux_loss, router_z_loss=z_loss, load=load_E,
               dropped_fraction=dropped, router_entropy=entropy)
    return y_BTD, aux

  def update_bias(self, load_E: jax.Array) -> None:
    """Applies `update_router_bias` with this layer's rate (call after the optimizer step)."""
    self.router_bias[...] = update_router_bias(self.router_bias[...], load_E,
                                               self.moe_cfg.bias_update_rate)

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
- MegaBlocks (Gale et al. 2022): dropless grouped matmuls (`jax.lax.ragged_dot`; on CPU a
  block-padded batched matmul, since XLA:CPU runs ragged_dot densely for every group).

Under a mesh whose `expert` rule names an axis of size > 1 the routed experts run expert-parallel
(`model.moe_parallel`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import moe_parallel, sharding
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

  The bias only changes which experts are selected, never the weights (DeepSeek-V3); the weights
  are multiplied by `routed_scaling_factor`. `probs` is the per-token distribution over all
  experts used by the balance loss and entropy.
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
  return idx_NK.astype(jnp.int32), weights_NK * moe_cfg.routed_scaling_factor, probs_NE


def experts_dense(cfg: ModelConfig, x_GECD, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
  """Per-expert FFN on capacity buffers [G, E, C, D] -> [G, E, C, D] (E may be a local shard)."""
  dtype = jnp.dtype(cfg.dtype)
  h_GECF = _ACTIVATION_FNS[cfg.activation](_bmatmul('gecd,edf->gecf', x_GECD, w_gate_EDF, dtype))
  if w_up_EDF is not None:
    h_GECF = h_GECF * _bmatmul('gecd,edf->gecf', x_GECD, w_up_EDF, dtype)
  return _bmatmul('gecf,efd->gecd', h_GECF, w_down_EFD, dtype)


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
  """MegaBlocks-style padding (Gale et al. 2022 §5): each group's rows start a fresh block of B
  rows, so every block belongs to one expert. -> (destination row of each sorted row in the
  padded [P*B] layout, out of range for rows past sum(group_sizes), expert of each block [P], P, B).
  P is static: at most E*(B-1) rows of padding in all."""
  e = group_sizes_E.shape[0]
  b = min(GMM_BLOCK, max(8, 1 << max(0, math.ceil(m / e) - 1).bit_length()))
  p = -(-(m + e * (b - 1)) // b)
  ends_E = jnp.cumsum(group_sizes_E)
  padded_E = -(-group_sizes_E // b) * b
  padded_ends_E = jnp.cumsum(padded_E)
  expert_M = _count_at_or_below(ends_E, m)  # Row -> expert; E = past the last group.
  safe_M = jnp.minimum(expert_M, e - 1)
  start_M = (padded_ends_E - padded_E)[safe_M]          # Padded start of the row's group.
  dest_M = start_M + jnp.arange(m) - (ends_E - group_sizes_E)[safe_M]
  dest_M = jnp.where(expert_M < e, dest_M, p * b)
  block_expert_P = jnp.minimum(_count_at_or_below(padded_ends_E // b, p), e - 1)
  return dest_M, block_expert_P, p, b


def experts_ragged(cfg: ModelConfig, x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Per-expert FFN on expert-sorted rows [M, D] -> [M, D] (grouped matmul). Rows past
  sum(group_sizes_E) belong to no expert and come back as zeros."""
  dtype = jnp.dtype(cfg.dtype)
  act = _ACTIVATION_FNS[cfg.activation]
  if native_grouped_matmul():
    def rdot(a, w):  # float32 accumulation, as in layers.matmul.
      return jax.lax.ragged_dot(a.astype(dtype), w.astype(dtype), group_sizes_E,
                                preferred_element_type=jnp.float32).astype(dtype)

    h_MF = act(rdot(x_MD, w_gate_EDF))
    if w_up_EDF is not None:
      h_MF = h_MF * rdot(x_MD, w_up_EDF)
    return rdot(h_MF, w_down_EFD)
  # Block-padded grouped matmul: each block multiplies its own expert's (gathered) weights.
  m, d = x_MD.shape
  dest_M, expert_P, p, b = _block_layout(group_sizes_E, m)
  # Scatter-adds into distinct rows: same as a set, and the transpose is a plain gather.
  x_PBD = jnp.zeros((p * b, d), x_MD.dtype).at[dest_M].add(x_MD, mode='drop').reshape(p, b, d)
  h_PBF = act(_bmatmul('pbd,pdf->pbf', x_PBD, w_gate_EDF[expert_P], dtype))
  if w_up_EDF is not None:
    h_PBF = h_PBF * _bmatmul('pbd,pdf->pbf', x_PBD, w_up_EDF[expert_P], dtype)
  y_PBD = _bmatmul('pbf,pfd->pbd', h_PBF, w_down_EFD[expert_P], dtype)
  return y_PBD.reshape(p * b, d).at[dest_M].get(mode='fill', fill_value=0)


def capacity_slots(idx_NK, g: int, s: int, e: int, c: int):
  """GShard/Switch capacity for G groups of S tokens, C slots per (group, expert).

  -> (slot [G, k*S] int32, kept fraction of token-slots). Token-slot m = j*S + s is token s's
  j-th choice (choice-major: every first choice ranks before any second choice, and within a
  choice tokens rank by position, GShard Alg. 1). slot = (g*E + expert)*C + rank in that expert's
  buffer, or G*E*C (out of range) when the rank is >= C: the slot is dropped and the block's
  residual carries the token.
  """
  k = idx_NK.shape[-1]
  idx_GM = idx_NK.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
  mask_GME = jax.nn.one_hot(idx_GM, e, dtype=jnp.int32)
  pos_GM = jnp.sum((jnp.cumsum(mask_GME, axis=1) - 1) * mask_GME, axis=-1)
  keep_GM = pos_GM < c
  slot_GM = (jnp.arange(g, dtype=jnp.int32)[:, None] * e + idx_GM) * c + pos_GM
  return jnp.where(keep_GM, slot_GM, g * e * c), jnp.mean(keep_GM.astype(jnp.float32))


def dispatch(x_GSD, slot_GM, e: int, c: int, dtype) -> jax.Array:
  """Token-slots into capacity buffers [G, E, C, D] (zeros where unfilled) by index: O(k*S*D)
  data movement, where the one-hot einsum of Switch/GShard costs O(S*E*C*D), quadratic in S."""
  g, s, d = x_GSD.shape
  x_GMD = jnp.tile(x_GSD.astype(dtype), (1, slot_GM.shape[1] // s, 1))  # Slot j*S + s -> token s.
  # A scatter-add (slots are distinct) transposes to a plain gather.
  buf = jnp.zeros((g * e * c, d), dtype).at[slot_GM.reshape(-1)].add(x_GMD.reshape(-1, d),
                                                                  mode='drop')
  return buf.reshape(g, e, c, d)


def combine(out_GECD, slot_GM, weights_NK) -> jax.Array:
  """Expert outputs back to tokens, weighted by the gates and summed over the k choices:
  [G, E, C, D] -> float32 [G, S, D]; dropped slots contribute zero."""
  g, _, _, d = out_GECD.shape
  k = weights_NK.shape[-1]
  s = slot_GM.shape[1] // k
  out_GMD = out_GECD.reshape(-1, d).at[slot_GM].get(mode='fill', fill_value=0)
  w_GKS = weights_NK.reshape(g, s, k).transpose(0, 2, 1).astype(jnp.float32)
  return jnp.einsum('gksd,gks->gsd', out_GMD.reshape(g, k, s, d).astype(jnp.float32), w_GKS)


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

  def _capacity(self, x_ND, idx_NK, weights_NK, b, t):
    """Fixed-capacity expert buffers per group (Switch/GShard)."""
    mc = self.moe_cfg
    g = b if mc.capacity_group == 'sequence' else 1
    s = (b * t) // g
    e, c = mc.num_experts, mc.capacity(s)
    slot_GM, kept = capacity_slots(idx_NK, g, s, e, c)
    x_GECD = dispatch(x_ND.reshape(g, s, -1), slot_GM, e, c, jnp.dtype(self.cfg.dtype))
    out_GECD = experts_dense(self.cfg, x_GECD, *self.expert_weights())
    return combine(out_GECD, slot_GM, weights_NK).reshape(b * t, -1), 1.0 - kept

  def _dropless(self, x_ND, idx_NK, weights_NK):
    """Sort token-slots by expert, grouped matmul, unsort, weighted sum over k (MegaBlocks)."""
    e, k = self.moe_cfg.num_experts, self.moe_cfg.top_k
    expert_M = idx_NK.reshape(-1)                 # slot m = n*k + j
    order_M = jnp.argsort(expert_M, stable=True)  # sorted position -> slot
    x_sorted_MD = jnp.take(x_ND, order_M // k, axis=0)
    group_sizes_E = jnp.bincount(expert_M, length=e).astype(jnp.int32)
    out_sorted_MD = experts_ragged(self.cfg, x_sorted_MD, group_sizes_E, *self.expert_weights())
    out_MD = jnp.zeros_like(out_sorted_MD).at[order_M].add(out_sorted_MD)  # Unsort (a permutation).
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

    ep = moe_parallel.active_plan(mc, b, t)
    if ep is not None:  # Experts split over a mesh axis; tokens travel by all-to-all.
      y_BTD, dropped = moe_parallel.expert_parallel_ffn(
          self.cfg, mc, ep, x_BTD, idx_NK.reshape(b, t, -1), weights_NK.reshape(b, t, -1),
          self.expert_weights())
      y_ND = y_BTD.reshape(b * t, d)
    elif mc.dispatch == 'dropless':
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

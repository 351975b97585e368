"""Group relative policy optimisation (Shao et al. 2024, DeepSeekMath §4.1) on sampled
completions: PPO's clipped surrogate with advantages relative to each prompt's group of samples,
and a per-token KL penalty to a frozen reference, no value model.

Batch (built by the rollout stage, train/rl/rollouts.py): one sampled completion per row,
  tokens      int32 [B, T+1]  prompt then completion, padded after
  loss_mask   float32 [B, T]  1 on the completion's targets
  old_logps   float32 [B, T]  log-probs of those targets under the policy that sampled them
  advantages  float32 [B]     (r - mean of its group) / (std of its group + eps), or the
                              Dr. GRPO / RLOO variants (config.align.advantage)

Log-probs are of logits / config.align.temperature, the distribution the rollouts sampled.

Per completion token, with ratio ρ = exp(log π - log π_old) and A the row's advantage
(`config.align`, train/align_config.py):

  loss_t = -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A) + kl_coef · [ρ ·] k3,
  k3 = exp(log π_ref - log π) - (log π_ref - log π) - 1       (Schulman 2020; ≥ 0, unbiased)

(the ρ on the KL term with `kl_importance`, as TRL by default: the samples came from π_old)

averaged per sequence then over sequences (grpo), over all tokens (bnpo), or summed over
sequences × max_completion_len (dr_grpo), as TRL's GRPOTrainer. Metrics: kl, clip fraction
(tokens whose ratio left the clip range on the side that matters), entropy, completion length
and the mean advantage.
"""
from __future__ import annotations

import jax.numpy as jnp

from train.align_config import RL_LOSSES, AlignConfig
from train.objectives.base import RLObjective, register
from train.objectives.logprobs import token_logps

RL_FIELDS = ('tokens', 'loss_mask', 'old_logps', 'advantages')


def clipped_surrogate(logp_BT, old_BT, adv, eps_low: float, eps_high: float):
  """(-min(ρA, clip(ρ)A) [B, T], clipped indicator [B, T], ρ [B, T]); advantages per sample
  [B] (GRPO) or per token [B, T] (PPO)."""
  ratio_BT = jnp.exp(logp_BT - old_BT)
  adv_BT = adv[:, None] if adv.ndim == 1 else adv
  unclipped, clipped = ratio_BT * adv_BT, jnp.clip(ratio_BT, 1 - eps_low, 1 + eps_high) * adv_BT
  was_clipped = ((ratio_BT < 1 - eps_low) & (adv_BT < 0)) | ((ratio_BT > 1 + eps_high) & (adv_BT > 0))
  return -jnp.minimum(unclipped, clipped), was_clipped.astype(jnp.float32), ratio_BT


def k3(logp_BT, ref_BT):
  """The k3 estimator of KL(π || π_ref) per token: exp(d) - d - 1, d = log π_ref - log π."""
  d = ref_BT - logp_BT
  return jnp.exp(d) - d - 1


def reduce(per_token_BT, mask_BT, a: AlignConfig):
  """The scalar loss from per-token losses, by `a.rl_loss`."""
  if a.rl_loss == 'grpo':
    per_seq = jnp.sum(per_token_BT * mask_BT, 1) / jnp.maximum(jnp.sum(mask_BT, 1), 1.0)
    return jnp.mean(per_seq)
  if a.rl_loss == 'bnpo':
    return jnp.sum(per_token_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
  if a.rl_loss == 'dr_grpo':
    return jnp.sum(per_token_BT * mask_BT) / (mask_BT.shape[0] * a.max_completion_len)
  raise ValueError(f'config.align.rl_loss={a.rl_loss!r}; expected one of {RL_LOSSES}')


@register('grpo')
class GroupRelativePolicy(RLObjective):
  fields = RL_FIELDS
  row_fields = ('advantages',)

  def loss(self, forward, batch):
    a = self.align
    tokens, mask = batch['tokens'], batch['loss_mask'].astype(jnp.float32)
    logp_BT, entropy_BT = token_logps(forward(tokens[:, :-1]) / a.temperature, tokens[:, 1:], mask)
    surrogate_BT, clipped_BT, ratio_BT = clipped_surrogate(logp_BT, batch['old_logps'], batch['advantages'],
                                                 a.clip_eps, a.clip_eps_high or a.clip_eps)
    per_token = surrogate_BT
    n = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {}
    if self.needs_reference:
      ref_BT, _ = token_logps(forward.reference(tokens[:, :-1]) / a.temperature, tokens[:, 1:],
                              mask)
      kl_BT = k3(logp_BT, ref_BT)
      if a.kl_importance:   # Sampled from pi_old: importance-weight the estimate to pi.
        kl_BT = kl_BT * ratio_BT
      per_token = per_token + a.kl_coef * kl_BT
      metrics['kl'] = jnp.sum(kl_BT * mask) / n
    loss = reduce(per_token, mask, a)
    metrics.update(
        loss=loss, weight=jnp.asarray(tokens.shape[0], jnp.float32),
        policy_loss=reduce(surrogate_BT, mask, a),
        clip_fraction=jnp.sum(clipped_BT * mask) / n,
        entropy=jnp.sum(entropy_BT) / n,
        completion_length=jnp.mean(jnp.sum(mask, 1)),
        advantage=jnp.mean(batch['advantages']))
    return loss, metrics

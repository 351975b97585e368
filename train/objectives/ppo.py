"""Proximal policy optimisation (Schulman et al. 2017) for a language model, as InstructGPT
(Ouyang et al. 2022) and TRL's PPOTrainer run it: a value head on the policy's own trunk
(`config.model.heads=('value',)`, model/heads.py), per-token advantages by GAE.

Batch (train/rl/rollouts.py, per completion token):
  tokens      int32 [B, T+1]   prompt then completion, padded after
  loss_mask   float32 [B, T]   1 on the completion's targets
  old_logps   float32 [B, T]   log-probs under the policy that sampled them
  old_values  float32 [B, T]   the value head's predictions then
  advantages  float32 [B, T]   GAE over the shaped reward (the sample's reward on its last
                               token, minus kl_coef x log(pi_old / pi_ref) on every token),
                               whitened over the batch
  returns     float32 [B, T]   advantages + old values (before whitening): the value target

Loss, means over every completion token of the batch (TRL's masked_mean):

  policy  max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)),  ρ = exp(log π - log π_old)
  value   ½ max((V - R)², (V_old + clip(V - V_old, ±vf_clip) - R)²)
  loss  = policy + vf_coef · value

The KL to the reference lives in the reward, so it is taken when sampling (train/rl/policy.py),
not here. Metrics: policy and value losses, clip fractions, entropy, approximate KL to π_old.
"""
from __future__ import annotations

import jax.numpy as jnp

from train.objectives.base import RLObjective, register
from train.objectives.grpo import clipped_surrogate
from train.objectives.logprobs import token_logps

PPO_FIELDS = ('tokens', 'loss_mask', 'old_logps', 'old_values', 'advantages', 'returns')


@register('ppo')
class ProximalPolicy(RLObjective):
  fields = PPO_FIELDS
  per_token_advantages = True

  def loss(self, forward, batch):
    a = self.align
    tokens, mask = batch['tokens'], batch['loss_mask'].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    mean = lambda x: jnp.sum(x * mask) / n
    x_BTD = forward.hidden(tokens[:, :-1])
    logp_BT, entropy_BT = token_logps(forward.logits(x_BTD) / a.temperature, tokens[:, 1:], mask)
    values_BT = forward.score(x_BTD, 'value')
    old_BT = batch['old_logps']
    surrogate_BT, clipped_BT, _ = clipped_surrogate(logp_BT, old_BT, batch['advantages'],
                                                    a.clip_eps, a.clip_eps_high or a.clip_eps)
    policy_loss = mean(surrogate_BT)
    old_v, ret = batch['old_values'], batch['returns']
    v_clipped = old_v + jnp.clip(values_BT - old_v, -a.vf_clip, a.vf_clip)
    vf1, vf2 = (values_BT - ret) ** 2, (v_clipped - ret) ** 2
    value_loss = 0.5 * mean(jnp.maximum(vf1, vf2))
    loss = policy_loss + a.vf_coef * value_loss
    return loss, dict(
        loss=loss, weight=jnp.asarray(tokens.shape[0], jnp.float32), policy_loss=policy_loss,
        value_loss=value_loss, clip_fraction=mean(clipped_BT),
        value_clip_fraction=mean((vf2 > vf1).astype(jnp.float32)), entropy=mean(entropy_BT),
        approx_kl=0.5 * mean((logp_BT - old_BT) ** 2),
        completion_length=jnp.mean(jnp.sum(mask, 1)))

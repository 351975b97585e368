"""Reward model training (InstructGPT, Ouyang et al. 2022): a scalar head on the decoder
(model/heads.py, `config.model.heads` holds 'reward') read at the completion's last token.

Batch (train/preference_data.py): rows as DPO's (`tokens`/`loss_mask` chosen,
`rejected_tokens`/`rejected_loss_mask` rejected), plus `pair` [B] (1: a preference pair,
0: a pointwise example whose row is in `tokens`), `score` [B] (the pointwise target) and
`margin` [B] (a pair's required margin, Llama 2's; 0 by default). With rewards r:

  pairs      -log σ(r_chosen - r_rejected - margin)          Bradley–Terry (TRL's RewardTrainer)
             + reward_center · mean((r_chosen + r_rejected)²)  (centred rewards, optional)
  pointwise  (r - score)²                                     regression on scores (Likert etc.)

The reward of a row is the head at the input position holding its last trained target (the
completion's EOS): everything the model read, like transformers' `*ForSequenceClassification`
at the last non-padding token. Metrics as TRL's: accuracy (r_chosen > r_rejected), margin,
mean/min/max reward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model import heads
from train.objectives.base import AlignObjective, register

REWARD_FIELDS = ('tokens', 'loss_mask', 'rejected_tokens', 'rejected_loss_mask', 'pair', 'score',
                 'margin')


def row_rewards(forward, tokens_BW: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """[B] float32: the reward head at each row's last completion token (its EOS input)."""
  x_BTD = forward.hidden(tokens_BW[:, :-1])
  s_BT = forward.score(x_BTD, 'reward')
  at_B = jnp.minimum(heads.last_index(mask_BT) + 1, s_BT.shape[1] - 1)
  return jnp.take_along_axis(s_BT, at_B[:, None], axis=1)[:, 0]


def pair_rewards(forward, batch) -> tuple[jax.Array, jax.Array]:
  """(r_chosen [B], r_rejected [B]) from one forward over both rows."""
  tokens = jnp.concatenate([batch['tokens'], batch['rejected_tokens']], axis=0)
  mask = jnp.concatenate([batch['loss_mask'], batch['rejected_loss_mask']], axis=0)
  r = row_rewards(forward, tokens, mask)
  b = batch['tokens'].shape[0]
  return r[:b], r[b:]


@register('reward')
class RewardModel(AlignObjective):
  fields = REWARD_FIELDS
  data_source = 'preference'
  rows_per_example = 2
  row_fields = ('pair', 'score', 'margin')

  def _terms(self, forward, batch):
    rc, rr = pair_rewards(forward, batch)
    pair = batch['pair'].astype(jnp.float32)
    real = (jnp.sum(batch['loss_mask'], axis=1) > 0).astype(jnp.float32)
    pair, point = pair * real, (1 - pair) * real
    bt_B = -jax.nn.log_sigmoid(rc - rr - batch['margin'])
    sq_B = jnp.square(rc - batch['score'])
    return rc, rr, pair, point, bt_B, sq_B

  def loss(self, forward, batch):
    rc, rr, pair, point, bt_B, sq_B = self._terms(forward, batch)
    n_pair, n_point = jnp.maximum(pair.sum(), 1.0), jnp.maximum(point.sum(), 1.0)
    loss = jnp.sum(bt_B * pair) / n_pair + jnp.sum(sq_B * point) / n_point
    total = loss
    if self.align.reward_center:
      total = total + self.align.reward_center * jnp.sum((rc + rr) ** 2 * pair) / n_pair
    all_r = jnp.concatenate([rc, jnp.where(pair > 0, rr, rc)])
    metrics = {'loss': loss, 'weight': pair.sum() + point.sum(),
               'accuracy': jnp.sum((rc > rr) * pair) / n_pair,
               'margin': jnp.sum((rc - rr) * pair) / n_pair,
               'mean_reward': jnp.mean(all_r), 'min_reward': jnp.min(all_r),
               'max_reward': jnp.max(all_r)}
    return total, metrics

  def eval_sums(self, forward, batch):
    rc, rr, pair, point, bt_B, sq_B = self._terms(forward, batch)
    return {'loss_sum': jnp.sum(bt_B * pair + sq_B * point), 'weight': pair.sum() + point.sum(),
            'accuracy_sum': jnp.sum((rc > rr) * pair), 'accuracy_count': pair.sum(),
            'margin_sum': jnp.sum((rc - rr) * pair), 'margin_count': pair.sum()}

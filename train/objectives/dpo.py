"""Direct preference optimisation and its variants: a policy trained on (chosen, rejected)
pairs against a frozen reference, with no reward model (Rafailov et al. 2023).

Batch (train/preference_data.py): `tokens` / `loss_mask` hold the chosen completion's row,
`rejected_tokens` / `rejected_loss_mask` the rejected one's ([B, T+1] and [B, T]); the masks
weigh the completion tokens only. Both rows go through one forward ([2B, T], as TRL's
concatenated forward). With log-ratios r = log pi(y|x) - log pi_ref(y|x) summed over the
completion and d = r_chosen - r_rejected (`config.align`, train/align_config.py):

  sigmoid  -(1-ls)·log σ(β d) - ls·log σ(-β d)          (label smoothing ls: conservative DPO)
  hinge    max(0, 1 - β d)                              (SLiC)
  ipo      (d̄ - 1/(2β))²   with d̄ from per-token averaged log-ratios (as TRL; Azar et al.)
  simpo    -log σ(β (ā_chosen - ā_rejected) - γ)        ā = length-averaged log-probs, no reference

Metrics follow TRL's names: rewards/chosen = β r_chosen, rewards/rejected, rewards/margins,
rewards/accuracies (chosen reward above rejected), logps/chosen and logps/rejected, and `kl`,
the implicit KL: the mean per-token log-ratio log pi - log pi_ref over both completions (0 at the
start). It is measured on the data's completions, not on samples of pi, so it is not a true
divergence and goes negative when DPO moves probability off both responses.

The reference is the run's frozen copy of `train.init_from`, or with a PEFT method the same
weights with the adapters switched off (LoRA-DPO: no second copy); train/step.py supplies it as
`forward.reference`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from train.align_config import DPO_LOSSES, AlignConfig
from train.objectives.base import AlignObjective, register
from train.objectives.logprobs import sequence_logps, token_logps

PAIR_FIELDS = ('tokens', 'loss_mask', 'rejected_tokens', 'rejected_loss_mask')


def pair_logps(logits_fn, batch, average: bool):
  """(chosen [B], rejected [B], per-token log-probs [2B, T], masks [2B, T], entropy [2B, T]) of
  one forward over both rows: `logits_fn(tokens_BT) -> logits_BTV`."""
  tokens = jnp.concatenate([batch['tokens'], batch['rejected_tokens']], axis=0)
  mask = jnp.concatenate([batch['loss_mask'], batch['rejected_loss_mask']], axis=0)
  mask = mask.astype(jnp.float32)
  logp_BT, entropy_BT = token_logps(logits_fn(tokens[:, :-1]), tokens[:, 1:], mask)
  seq = sequence_logps(logp_BT, mask, average)
  b = batch['tokens'].shape[0]
  return seq[:b], seq[b:], logp_BT, mask, entropy_BT


def dpo_losses(policy_c, policy_r, ref_c, ref_r, len_c, len_r, a: AlignConfig):
  """Per-pair losses [B] of `a.dpo_loss` from summed log-probs [B] and completion lengths [B]
  (the variants that average divide by them)."""
  if a.dpo_loss == 'simpo':
    logits = policy_c / len_c - policy_r / len_r - a.simpo_gamma / a.beta
    return (-jax.nn.log_sigmoid(a.beta * logits) * (1 - a.label_smoothing)
            - jax.nn.log_sigmoid(-a.beta * logits) * a.label_smoothing)
  delta = (policy_c - ref_c) - (policy_r - ref_r)
  if a.dpo_loss == 'sigmoid':
    return (-jax.nn.log_sigmoid(a.beta * delta) * (1 - a.label_smoothing)
            - jax.nn.log_sigmoid(-a.beta * delta) * a.label_smoothing)
  if a.dpo_loss == 'hinge':
    return jax.nn.relu(1 - a.beta * delta)
  if a.dpo_loss == 'ipo':
    avg = (policy_c - ref_c) / len_c - (policy_r - ref_r) / len_r
    return (avg - 1 / (2 * a.beta)) ** 2
  raise ValueError(f'config.align.dpo_loss={a.dpo_loss!r}; expected one of {DPO_LOSSES}')


@register('dpo')
class DirectPreference(AlignObjective):
  fields = PAIR_FIELDS
  data_source = 'preference'
  rows_per_example = 2

  @classmethod
  def wants_reference(cls, align) -> bool:
    return align.dpo_loss != 'simpo'   # SimPO is reference-free.

  def _terms(self, forward, batch):
    a = self.align
    pc, pr, logp_BT, mask, entropy_BT = pair_logps(forward, batch, average=False)
    b = pc.shape[0]
    len_c, len_r = (jnp.maximum(jnp.sum(m, axis=1), 1.0) for m in (mask[:b], mask[b:]))
    if self.needs_reference:
      rc, rr, ref_logp_BT, _, _ = pair_logps(forward.reference, batch, average=False)
    else:   # SimPO: no reference; the log-ratios below read as the policy's own log-probs.
      rc, rr, ref_logp_BT = jnp.zeros_like(pc), jnp.zeros_like(pr), jnp.zeros_like(logp_BT)
    losses = dpo_losses(pc, pr, rc, rr, len_c, len_r, a)
    chosen_r, rejected_r = a.beta * (pc - rc), a.beta * (pr - rr)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {
        'rewards/chosen': jnp.mean(chosen_r), 'rewards/rejected': jnp.mean(rejected_r),
        'rewards/margins': jnp.mean(chosen_r - rejected_r),
        'rewards/accuracies': jnp.mean((chosen_r > rejected_r).astype(jnp.float32)),
        'logps/chosen': jnp.mean(pc), 'logps/rejected': jnp.mean(pr),
        'kl': jnp.sum((logp_BT - ref_logp_BT) * mask) / tokens,
        'entropy': jnp.sum(entropy_BT) / tokens,
    }
    return losses, chosen_r - rejected_r, metrics

  def loss(self, forward, batch):
    losses, _, metrics = self._terms(forward, batch)
    loss = jnp.mean(losses)
    return loss, dict(metrics, loss=loss, weight=jnp.asarray(losses.shape[0], jnp.float32))

  def eval_sums(self, forward, batch):
    """Sums over the pairs of the loss, the implicit reward's accuracy and margin; rows without
    a trained token (padding of a short last batch) count for nothing."""
    losses, margin_B, _ = self._terms(forward, batch)
    real = (jnp.sum(batch['loss_mask'], axis=1) > 0).astype(jnp.float32)
    return {'loss_sum': jnp.sum(losses * real), 'weight': jnp.sum(real),
            'accuracy_sum': jnp.sum((margin_B > 0) * real), 'margin_sum': jnp.sum(margin_B * real)}

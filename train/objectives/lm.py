"""Next-token prediction (pretraining and continued pretraining): weighted cross-entropy on the
targets, plus PaLM's z-loss on the softmax normaliser."""
from __future__ import annotations

import jax

from train.loss import cross_entropy
from train.objectives.base import Objective, register


@register('lm')
class NextToken(Objective):
  """Cross-entropy of every target (weighted by `loss_mask` when the batch has one). With
  `data.attend_across_documents=False` each packed document attends only to itself, with its
  own positions from 0, as if it were alone in its row."""

  def __init__(self, cfg=None, *, z_loss: float | None = None):
    super().__init__(cfg)
    self.z_loss = float(cfg.train.get('z_loss', 0.0) if z_loss is None else z_loss)
    self.chunk_tokens = int(cfg.train.get('loss_chunk_tokens', 0)) if cfg is not None else 0
    self.separate_documents = (cfg is not None
                               and not cfg.data.get('attend_across_documents', True))

  def batch_fields(self):
    return ('tokens', 'segment_ids', 'positions') if self.separate_documents else ('tokens',)

  def _cross_entropy(self, forward, batch, z_loss):
    kw = {}
    if self.separate_documents:
      kw = dict(segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'])
    args = (batch['tokens'][:, :-1], batch['tokens'][:, 1:], batch.get('loss_mask'), z_loss)
    if self.chunk_tokens and hasattr(forward, 'cross_entropy'):  # No [B, T, V] logits.
      return forward.cross_entropy(*args, chunk_tokens=self.chunk_tokens, **kw)
    tokens_BT, targets_BT, weights_BT, _ = args
    logits_BTV = forward(tokens_BT, **kw)
    with jax.named_scope('head_loss'):
      return cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss)

  def loss(self, forward, batch):
    return self._cross_entropy(forward, batch, self.z_loss)

  def eval_sums(self, forward, batch):
    _, aux = self._cross_entropy(forward, batch, 0.0)
    return {'loss_sum': aux['loss'] * aux['weight'], 'weight': aux['weight']}

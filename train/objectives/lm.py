"""Next-token prediction (pretraining and continued pretraining): weighted cross-entropy on the
targets, plus PaLM's z-loss on the softmax normaliser."""
from __future__ import annotations

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
    self.separate_documents = (cfg is not None
                               and not cfg.data.get('attend_across_documents', True))

  def batch_fields(self):
    return ('tokens', 'segment_ids', 'positions') if self.separate_documents else ('tokens',)

  def _logits(self, forward, batch):
    kw = {}
    if self.separate_documents:
      kw = dict(segment_ids_BT=batch['segment_ids'], positions_BT=batch['positions'])
    return forward(batch['tokens'][:, :-1], **kw)

  def loss(self, forward, batch):
    return cross_entropy(self._logits(forward, batch), batch['tokens'][:, 1:],
                         batch.get('loss_mask'), self.z_loss)

  def eval_sums(self, forward, batch):
    _, aux = cross_entropy(self._logits(forward, batch), batch['tokens'][:, 1:],
                           batch.get('loss_mask'), 0.0)
    return {'loss_sum': aux['loss'] * aux['weight'], 'weight': aux['weight']}

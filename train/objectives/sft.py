"""Supervised fine-tuning: next-token cross-entropy on the trained tokens only (completions,
assistant messages; `train/sft_data.py` sets `loss_mask`), each packed example attending only to
itself with positions from 0. The loss is the mean over the batch's trained tokens, which is
what TRL's SFTTrainer computes with completion-only loss (`completion_only_loss=True`)."""
from __future__ import annotations

from train.objectives.base import register
from train.objectives.lm import NextToken


@register('sft')
class SupervisedFineTuning(NextToken):
  fields = ('tokens', 'loss_mask', 'segment_ids', 'positions')
  data_source = 'sft'

  def __init__(self, cfg=None, *, z_loss: float | None = None):
    super().__init__(cfg, z_loss=z_loss)
    self.separate_documents = True

  def batch_fields(self):
    return self.fields

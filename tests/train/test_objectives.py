"""Objectives are a seam: one defined here, in the test file alone, trains through the real
trainer (no edit of train/), and next-token prediction keeps computing what it did."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ConfigError
from tests.conftest import tiny_train_config, write_code_corpus
from train import config_schema, data as data_lib, objectives, trainer
from train.loss import cross_entropy


@objectives.register('even_targets_only')
class EvenTargetsOnly(objectives.Objective):
  """A toy objective: cross-entropy on the targets at even positions only, and it reports how
  many targets it scored."""
  fields = ('tokens', 'loss_mask')

  def loss(self, forward, batch):
    tokens_BT1 = batch['tokens']
    logits_BTV = forward(tokens_BT1[:, :-1])
    even_BT = (jnp.arange(logits_BTV.shape[1]) % 2 == 0)[None, :] * batch['loss_mask']
    total, aux = cross_entropy(logits_BTV, tokens_BT1[:, 1:], even_BT)
    return total, {'loss': aux['loss'], 'scored': aux['weight'], 'weight': aux['weight']}


@pytest.mark.slow
def test_an_objective_defined_in_a_test_trains_through_the_real_trainer(tmp_path):
  glob = write_code_corpus(tmp_path / 'corpus')
  cfg = tiny_train_config(glob, steps=8, lr=1e-2, objective='even_targets_only', eval_every=8)
  result = trainer.train(cfg, str(tmp_path / 'w'), log=lambda *_: None)
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'w', 'metrics.jsonl'))]
  train_rows = [r for r in rows if 'loss' in r]
  # Its own metric reached the log: half of the 8 x 32 targets of every batch were scored.
  assert all(r['scored'] == 8 * 32 // 2 for r in train_rows)
  assert train_rows[-1]['loss'] < train_rows[0]['loss']
  assert np.isfinite(result.eval['eval_loss'])
  # The trainer returns every logged step's metrics, not only the last.
  assert [h['step'] for h in result.history if 'loss' in h] == list(range(1, 9))


def test_unknown_objective_is_refused_naming_the_registered_ones(tmp_path):
  cfg = tiny_train_config(str(tmp_path / '*.txt'), objective='dpo_typo')
  with pytest.raises(ConfigError, match=r"config\.train\.objective='dpo_typo'.*'lm'"):
    config_schema.validate(cfg)


def test_document_ids_restart_after_each_eos():
  eos = 1
  inputs = np.array([[5, 6, eos, 7, eos, 8, 9, 9]])
  seg, pos = data_lib.document_ids(inputs, eos)
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 3, 3, 3]])
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 1, 2]])
  fields = data_lib.batch_fields(np.concatenate([inputs, [[4]]], 1), ('tokens', 'loss_mask'), eos)
  assert fields['loss_mask'].shape == (1, 8) and fields['loss_mask'].all()
  with pytest.raises(ValueError, match=r"\['chosen'\]"):
    data_lib.batch_fields(inputs, ('tokens', 'chosen'), eos)

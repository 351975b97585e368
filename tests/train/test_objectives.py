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


def test_document_ids_restart_at_each_eos():
  eos = 1
  inputs = np.array([[5, 6, eos, 7, eos, 8, 9, 9]])
  seg, pos = data_lib.document_ids(inputs, eos)
  np.testing.assert_array_equal(seg, [[1, 1, 2, 2, 3, 3, 3, 3]])
  np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 0, 1, 2, 3]])
  fields = data_lib.batch_fields(np.concatenate([inputs, [[4]]], 1), ('tokens', 'loss_mask'), eos)
  assert fields['loss_mask'].shape == (1, 8) and fields['loss_mask'].all()
  with pytest.raises(ValueError, match=r"\['chosen'\]"):
    data_lib.batch_fields(inputs, ('tokens', 'chosen'), eos)


@pytest.mark.parametrize('impl', ['xla', 'flash'])
def test_packed_documents_apart_have_the_losses_they_have_alone(impl):
  # data.attend_across_documents=False: per-document losses of a packed row equal each
  # document's loss run alone, for every attention backend.
  from flax import nnx
  from model import transformer
  from tests.conftest import tiny_model_config
  from train import step as step_lib
  import ml_collections
  eos = 1
  model_cfg = tiny_model_config(attention_impl=impl)
  graphdef, params = nnx.split(transformer.Decoder(model_cfg, nnx.Rngs(params=0)))
  params = params.to_pure_dict()
  cfg = ml_collections.ConfigDict({'train': {'z_loss': 0.0},
                                   'data': {'attend_across_documents': False}})
  objective = objectives.get('lm')(cfg)
  assert objective.batch_fields() == ('tokens', 'segment_ids', 'positions')
  loss_fn = step_lib.make_objective_loss(graphdef, objective)
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(2, 61, 9).tolist(), rng.integers(2, 61, 6).tolist()

  def loss_of(row, mask):
    tokens = np.asarray([row], np.int32)
    batch = {k: jnp.asarray(v) for k, v in
             data_lib.batch_fields(tokens, objective.batch_fields(), eos).items()}
    batch['loss_mask'] = jnp.asarray([mask], jnp.float32)
    return float(loss_fn(params, batch)[1]['loss'])

  packed = [eos] + doc_a + [eos] + doc_b + [eos]
  n_a = len(doc_a) + 1   # Targets of document a: its tokens and its EOS.
  mask_a = [1.0] * n_a + [0.0] * (len(packed) - 1 - n_a)
  mask_b = [0.0] * n_a + [1.0] * (len(packed) - 1 - n_a)
  alone_a = loss_of([eos] + doc_a + [eos], [1.0] * n_a)
  alone_b = loss_of([eos] + doc_b + [eos], [1.0] * (len(doc_b) + 1))
  assert abs(loss_of(packed, mask_a) - alone_a) <= 1e-6
  assert abs(loss_of(packed, mask_b) - alone_b) <= 1e-6
  # Attending across documents, b's loss changes: the mask really is what separates them.
  across = objectives.get('lm')(ml_collections.ConfigDict(
      {'train': {'z_loss': 0.0}, 'data': {'attend_across_documents': True}}))
  tokens = jnp.asarray([packed], jnp.int32)
  _, aux = step_lib.make_objective_loss(graphdef, across)(
      params, {'tokens': tokens, 'loss_mask': jnp.asarray([mask_b], jnp.float32)})
  assert abs(float(aux['loss']) - alone_b) > 1e-4

"""train/scoring.py: logits and log-likelihoods of a workdir's model from outside the trainer."""
import jax
import numpy as np
import pytest
from flax import nnx

from train.scoring import Scorer

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def scorer(trained_workdir):
  return Scorer.load(trained_workdir[0])


def test_logits_match_the_model_and_rows_are_independent(scorer):
  tokens = np.random.default_rng(0).integers(0, scorer.model_cfg.vocab_size, (3, 11))
  got = scorer.logits(tokens)
  model = nnx.merge(scorer.graphdef, jax.device_get(scorer.params))
  want = np.asarray(model.forward(tokens)[0])
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(scorer.logits(tokens[1:2]), got[1:2], atol=1e-5)   # Alone = batched.


def test_loglikelihood_is_the_sum_of_the_continuation_log_probs(scorer):
  tok = scorer.tokenizer
  pairs = [('def func_1_2(x, y=2):', '\n    """Return x plus 2."""'), ('import', ' os'),
           ('x', ' = 1')]
  together = scorer.loglikelihood(pairs, batch_size=3)
  alone = [scorer.loglikelihood([p])[0] for p in pairs]
  for (a, ga), (b, gb) in zip(together, alone):
    assert a == pytest.approx(b, abs=1e-4) and ga == gb
  ctx, cont = [tok.doc_start_id] + tok.encode(pairs[1][0]), tok.encode(pairs[1][1])
  logp = jax.nn.log_softmax(scorer.logits(np.asarray([ctx + cont])), axis=-1)[0]
  want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
  assert together[1][0] == pytest.approx(want, abs=1e-4) and together[1][0] < 0
  # Token ids work without text; bad input is named.
  assert scorer.loglikelihood([(ctx, cont)])[0][0] == pytest.approx(want, abs=1e-4)
  with pytest.raises(ValueError, match='max_seq_len'):
    scorer.logits(np.zeros((1, scorer.model_cfg.max_seq_len + 1), np.int32))
  with pytest.raises(ValueError, match='at least one token'):
    scorer.loglikelihood([('x', [])])

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import transformer
from model.inference.beam import beam_search
from model.inference.sampler import Sampler
from tests.conftest import random_tokens, tiny_model_config

V, P, N = 5, 3, 3   # Brute-force sizes: vocab, prompt, new tokens (V**N = 125 sequences).


@pytest.fixture(scope='module')
def model():
  """A random 5-token model (one build: eager initialisation is slow on CPU)."""
  graphdef, params = nnx.split(transformer.build(tiny_model_config(vocab_size=V), seed=2))
  return graphdef, params.to_pure_dict()


@pytest.fixture(scope='module')
def tiny_vocab(model):
  """The model, a prompt, and the uncached log-prob of every N-token continuation."""
  graphdef, params = model
  prompt = np.asarray(random_tokens(1, (P,), V)).tolist()
  conts_CN = np.asarray(list(itertools.product(range(V), repeat=N)), np.int32)
  seqs = jnp.asarray(np.concatenate([np.tile(prompt, (len(conts_CN), 1)), conts_CN], 1))
  logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, seqs)
  logp_CNV = np.asarray(jax.nn.log_softmax(logits[:, P - 1:-1], axis=-1))
  logp_CN = np.take_along_axis(logp_CNV, conts_CN[..., None], -1)[..., 0]
  return graphdef, params, prompt, conts_CN, logp_CN


def prefix_logprob(conts_CN, logp_CN, tokens):
  """Brute-force log-prob of a continuation of up to N tokens (a prefix of some full one)."""
  row = np.flatnonzero((conts_CN[:, :len(tokens)] == tokens).all(1))[0]
  return float(logp_CN[row, :len(tokens)].sum())


def test_width_one_is_greedy(model):
  graphdef, params = model
  prompts = np.asarray(random_tokens(20, (2, 6), V)).tolist()  # One length: one compile each.
  for limit in (0, 2):   # The vocab limit is traced: no recompilation.
    greedy = Sampler(graphdef, params, vocab_limit=limit)(prompts, max_new_tokens=6)
    assert limit or greedy[0] != greedy[1]
    for prompt, want in zip(prompts, greedy):
      [best] = beam_search(graphdef, params, prompt, width=1, max_new_tokens=6, vocab_limit=limit)
      assert best.tokens == want
      assert limit == 0 or max(want) < limit


def test_full_width_beam_is_exact_against_brute_force(tiny_vocab):
  graphdef, params, prompt, conts_CN, logp_CN = tiny_vocab
  total_C = logp_CN.sum(1)
  width = V ** (N - 1)
  got = beam_search(graphdef, params, prompt, width=width, max_new_tokens=N)
  best = np.argsort(-total_C, kind='stable')[:width]
  assert {tuple(r.tokens) for r in got} == {tuple(conts_CN[c]) for c in best}
  np.testing.assert_allclose([r.logprob for r in got], total_C[best], atol=1e-4)
  # No EOS: every hypothesis has N tokens, so score = logprob / N.
  np.testing.assert_allclose([r.score for r in got], total_C[best] / N, atol=1e-4)

  # A narrow beam: sorted, each logprob is its tokens' true log-prob, and at least greedy.
  narrow = beam_search(graphdef, params, prompt, width=3, max_new_tokens=N)
  assert len(narrow) == 3
  scores = [r.score for r in narrow]
  assert scores == sorted(scores, reverse=True)
  for r in narrow:
    assert r.logprob == pytest.approx(prefix_logprob(conts_CN, logp_CN, r.tokens), abs=1e-4)
  greedy = []   # Greedy decoding read off the brute-force table.
  for k in range(N):
    rows = (conts_CN[:, :k] == greedy).all(1)
    greedy.append(int(conts_CN[rows][np.argmax(logp_CN[rows, k]), k]))
  assert narrow[0].logprob >= prefix_logprob(conts_CN, logp_CN, greedy) - 1e-5


@pytest.mark.parametrize('length_penalty', [0.0, 2.0])
def test_eos_cuts_hypotheses_and_scores_follow_length_penalty(tiny_vocab, length_penalty):
  graphdef, params, prompt, conts_CN, logp_CN = tiny_vocab
  eos = int(conts_CN[np.argmax(logp_CN.sum(1)), 1])   # Second token of the best sequence.
  # Brute force: each continuation cut after its first EOS, deduplicated, scored.
  hyps = {}
  for c in conts_CN:
    cut = tuple(c[:list(c).index(eos) + 1]) if eos in c else tuple(c)
    lp = prefix_logprob(conts_CN, logp_CN, list(cut))
    hyps[cut] = (lp, lp / len(cut) ** length_penalty)
  width = V ** (N - 1)  # >= every live prefix, so the search is exact.
  got = beam_search(graphdef, params, prompt, width=width, max_new_tokens=N, eos_id=eos,
                    length_penalty=length_penalty)
  want = sorted(hyps, key=lambda h: -hyps[h][1])[:width]
  assert [tuple(r.tokens) for r in got] == want
  assert any(r.tokens[-1] == eos for r in got)   # Some hypotheses did stop at EOS.
  for r in got:
    assert eos not in r.tokens[:-1]
    assert r.logprob == pytest.approx(hyps[tuple(r.tokens)][0], abs=1e-4)
    assert r.score == pytest.approx(r.logprob / len(r.tokens) ** length_penalty, rel=1e-5)


def test_bad_arguments_are_refused_by_name(model):
  graphdef, params = model
  prompt = [1, 2, 3]
  for kw, match in ((dict(width=0), 'width=0'), (dict(max_new_tokens=0), 'max_new_tokens=0'),
                    (dict(prompt=[]), 'prompt'),
                    (dict(max_new_tokens=62, max_seq_len=64), 'max_seq_len=64')):
    args = dict(prompt=prompt, width=2, max_new_tokens=2) | kw
    with pytest.raises(ValueError, match=match):
      beam_search(graphdef, params, args.pop('prompt'), **args)

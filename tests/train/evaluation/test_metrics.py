"""Per-example metrics and bootstrap intervals."""
import itertools
import math

import numpy as np
import pytest

from train.evaluation import metrics as M


def _brute_pass_at_k(n, c, k):
  """The definition: the share of k-subsets of the n samples holding at least one pass."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize('n,c,k', [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 2, 1), (5, 2, 3),
                                   (10, 3, 5), (10, 9, 2), (12, 1, 12), (8, 8, 4)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
  assert M.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
  assert M.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_1_is_the_pass_rate_and_large_n_is_stable():
  assert M.pass_at_k(200, 37, 1) == pytest.approx(37 / 200)
  assert M.pass_at_k(1000, 1, 100) == pytest.approx(0.1)
  assert 0.0 < M.pass_at_k(1000, 3, 10) < 1.0


@pytest.mark.parametrize('n,c,k,field', [(5, 6, 1, 'c <= n'), (5, -1, 1, 'c <= n'),
                                         (5, 1, 0, 'k >= 1'), (3, 1, 4, 'at least 4')])
def test_pass_at_k_bad_counts(n, c, k, field):
  with pytest.raises(ValueError, match=field):
    M.pass_at_k(n, c, k)


def test_exact_match_normalises_like_squad():
  assert M.exact_match('The  Answer!', ['answer'])
  assert not M.exact_match('answers', ['answer'])
  assert M.exact_match('85', ['84', '85'])


def test_extract_answer_prefers_the_explicit_form():
  patterns = (r'[Tt]he answer is\s*(-?\d[\d,]*)', 'last_number')
  assert M.extract_answer('7 + 8 = 15. The answer is 1,015. Then 3', patterns) == '1,015'
  assert M.extract_answer('so 3 then -1,204 left', patterns) == '-1204'
  assert M.extract_answer('no digits', patterns) == ''


def test_token_f1_and_rouge_l():
  p, r = 1.0, 2 / 3   # 'cat sat' of 'cat sat' and of 'cat sat down' (articles dropped).
  assert M.token_f1('the cat sat', ['a cat sat down']) == pytest.approx(2 * p * r / (p + r))
  assert M.token_f1('', ['']) == 1.0 and M.token_f1('x', ['']) == 0.0
  from rouge_score import rouge_scorer
  ref = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
  for pred, gold in [('Return the sum of x and y', 'Return x plus y'), ('abc', 'xyz')]:
    assert M.rouge_l(pred, [gold]) == ref.score(gold, pred)['rougeL'].fmeasure
  assert M.rouge_l('return x', ['nothing alike', 'return x']) == 1.0   # Best reference.


def test_bootstrap_interval_covers_the_mean_and_is_deterministic():
  rng = np.random.default_rng(0)
  x = (rng.random(400) < 0.3).astype(float)
  lo, hi = M.bootstrap_ci(x)
  assert lo < x.mean() < hi and hi - lo < 0.12
  assert M.bootstrap_ci(x) == (lo, hi)               # Seeded.
  # Normal approximation of a proportion: the widths agree to ~20%.
  se = math.sqrt(x.mean() * (1 - x.mean()) / x.size)
  assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)
  s = M.summarize([1.0, 1.0, 1.0])
  assert s == {'mean': 1.0, 'ci_low': 1.0, 'ci_high': 1.0, 'n': 3}
  assert math.isnan(M.summarize([])['mean'])

"""Agreement statistics against sklearn / scipy, bias rates, the reference set and the report."""
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from train.evaluation import calibration
from train.evaluation.autorater import CORRECTNESS, Judge, PairwiseVerdict
from train.evaluation.calibration import (agreement, cohen_kappa, first_position_rate,
                                          position_bias_rate, reference_labelled_set, spearman)


def sk_kappa(a, b, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return cohen_kappa_score(a, b, **kw)


def same(x, y):
  return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, abs_tol=1e-12)


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('weights', [None, 'linear', 'quadratic'])
def test_kappa_matches_sklearn_on_random_labels(seed, weights):
  rng = np.random.default_rng(seed)
  n, k = int(rng.integers(1, 40)), int(rng.integers(1, 6))
  a = rng.integers(1, k + 1, n).tolist()
  b = [x if rng.random() < 0.6 else int(rng.integers(1, k + 1)) for x in a]
  assert same(cohen_kappa(a, b, weights=weights), sk_kappa(a, b, weights=weights))
  labels = [1, 2, 3, 4, 5]
  assert same(cohen_kappa(a, b, labels, weights), sk_kappa(a, b, labels=labels, weights=weights))


@pytest.mark.parametrize('a, b, labels', [
    ([1, 1, 1], [1, 1, 1], None),           # One label for both raters: undefined (nan).
    ([1, 1, 1], [2, 2, 2], None),
    ([1, 1, 2], [1, 1, 1], None),
    (['a', 'b'], ['b', 'a'], None),
    (['a', 'b', 'a'], ['a', 'b', 'a'], None),
    (['a', 'tie', 'b'], ['a', 'a', 'b'], ['a', 'b', 'tie']),
    ([1, 2, 3], [1, 2, 3], [1, 2]),         # Ratings outside `labels` are dropped.
    ([7], [7], None),
])
def test_kappa_degenerate_cases_match_sklearn(a, b, labels):
  assert same(cohen_kappa(a, b, labels), sk_kappa(a, b, labels=labels))


def test_kappa_and_agreement_bad_input():
  with pytest.raises(ValueError, match='differ in length'):
    cohen_kappa([1, 2], [1])
  with pytest.raises(ValueError, match='at least one'):
    agreement([], [])
  with pytest.raises(ValueError, match='weights'):
    cohen_kappa([1], [1], weights='cubic')
  assert math.isnan(cohen_kappa([1, 2], [1, 2], labels=[9]))


def test_agreement():
  assert agreement([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
  assert agreement(['a'], ['a']) == 1.0


@pytest.mark.parametrize('seed', range(4))
def test_spearman_matches_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=20)
  y = x + rng.normal(size=20) if seed % 2 else rng.integers(1, 4, 20).astype(float)
  assert math.isclose(spearman(x.tolist(), y.tolist()), stats.spearmanr(x, y).statistic)


def test_spearman_undefined_is_nan_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1.0], [2.0]))
  assert isinstance(spearman([1, 2, 3], [3, 2, 1]), float)


def verdict(first_picked, winner='a'):
  return PairwiseVerdict(winner=winner if first_picked == 1 else 'tie', p_a=0.5,
                         consistent=first_picked == 1, first_position_picked=first_picked,
                         rationale='', prompts=('', ''))


def test_position_bias_rates():
  vs = [verdict(1), verdict(2), verdict(0), verdict(1)]
  assert position_bias_rate(vs) == 0.5
  assert first_position_rate(vs) == 0.5
  assert first_position_rate([verdict(2), verdict(1)]) == 0.75
  with pytest.raises(ValueError, match='at least one'):
    position_bias_rate([])


def test_reference_set_is_deterministic_balanced_and_correct():
  items = reference_labelled_set(n=50, seed=3)
  assert items == reference_labelled_set(n=50, seed=3) != reference_labelled_set(n=50, seed=4)
  pairs = [it for it in items if 'a' in it]
  points = [it for it in items if 'response' in it]
  assert len(pairs) == len(points) == 50
  assert sum(it['label'] == 'a' for it in pairs) == 25
  assert sum(it['label'] == 5 for it in points) == 25
  for it in pairs:
    right, wrong = (it['a'], it['b']) if it['label'] == 'a' else (it['b'], it['a'])
    assert right.endswith(f"= {it['answer']}.") and right != wrong
    assert it['prompt'].startswith('What is ')
  for it in points:
    assert it['response'].endswith(f"= {it['answer']}.") == (it['label'] == 5)
  with pytest.raises(ValueError, match='n must be >= 1'):
    reference_labelled_set(0)


def test_meta_evaluate_rejects_bad_labels():
  judge = Judge(None, CORRECTNESS)   # Labels are checked before the model is asked.
  for item, match in [(dict(prompt='p', a='x', b='y', label='c'), 'item 0: pairwise label'),
                      (dict(prompt='p', response='x', label=7), 'item 0: pointwise label'),
                      (dict(prompt='p', label=1), 'item 0: expected "response"'),
                      (dict(prompt='p', response='x'), 'item 0: expected a dict with a "label"')]:
    with pytest.raises(ValueError, match=match):
      calibration.meta_evaluate(judge, [item])
  with pytest.raises(ValueError, match='empty'):
    calibration.meta_evaluate(judge, [])


def test_format_report_handles_missing_parts():
  report = dict(judge='j', rubric='r', n=3, n_pointwise=3, n_pairwise=0, kappa=0.5,
                kappa_source='pointwise', agreement=0.6, position_bias_rate=math.nan,
                first_position_rate=math.nan, pointwise_kappa=0.5, pointwise_kappa_quadratic=0.7,
                pointwise_agreement=0.6, spearman=math.nan, n_truncated=2)
  text = calibration.format_report(report)
  assert "Cohen's kappa     0.500" in text and 'position bias     n/a' in text
  assert 'Spearman n/a' in text and '2 judge prompts were cut' in text


"""How far to trust an autorater: its verdicts against human (or reference) labels.

    report = meta_evaluate(Judge(model, CORRECTNESS), reference_labelled_set(n=100))
    print(format_report(report))     # agreement, Cohen's kappa, Spearman, position bias

A labelled set mixes pointwise items {prompt, response, label: a score on the rubric's scale}
and pairwise items {prompt, a, b, label: 'a' | 'b' | 'tie'}; `side_by_side.import_labels` turns
human raters' choices into such labels, `reference_labelled_set` builds one with known answers.

    python -m train.evaluation.calibration --workdir runs/judge --n 100
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

PAIR_LABELS = ('a', 'b', 'tie')


def _check_pair(a, b, what: str) -> tuple[list, list]:
  a, b = list(a), list(b)
  if len(a) != len(b):
    raise ValueError(f'{what}: the two ratings differ in length ({len(a)} vs {len(b)})')
  if not a:
    raise ValueError(f'{what}: expected at least one rating, got none')
  return a, b


def agreement(a: Sequence, b: Sequence) -> float:
  """Fraction of positions where the two raters give the same label."""
  a, b = _check_pair(a, b, 'agreement')
  return float(np.mean([x == y for x, y in zip(a, b)]))


def cohen_kappa(a: Sequence, b: Sequence, labels: Sequence | None = None,
                weights: str | None = None) -> float:
  """Cohen's kappa (po - pe) / (1 - pe), as `sklearn.metrics.cohen_kappa_score`: categories are
  `labels` (default: the sorted labels seen; ratings outside `labels` are dropped); `weights`
  'linear' or 'quadratic' penalise disagreement by category-index distance (ordinal scores).
  nan when undefined (both raters always give one and the same label)."""
  a, b = _check_pair(a, b, 'cohen_kappa')
  if weights not in (None, 'linear', 'quadratic'):
    raise ValueError(f"cohen_kappa: weights must be None, 'linear' or 'quadratic', got {weights!r}")
  cats = list(labels) if labels is not None else sorted(set(a) | set(b))
  index = {c: i for i, c in enumerate(cats)}
  confusion = np.zeros((len(cats), len(cats)))
  for x, y in zip(a, b):
    if x in index and y in index:
      confusion[index[x], index[y]] += 1
  n = confusion.sum()
  if n == 0:
    return math.nan
  expected = np.outer(confusion.sum(1), confusion.sum(0)) / n
  dist = np.abs(np.arange(len(cats))[:, None] - np.arange(len(cats))[None, :]).astype(float)
  w = {None: (dist > 0).astype(float), 'linear': dist, 'quadratic': dist ** 2}[weights]
  denominator = float((w * expected).sum())
  if denominator == 0:
    return math.nan
  return float(1 - (w * confusion).sum() / denominator)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (`scipy.stats.spearmanr`); nan, without a warning, when it is
  undefined (fewer than 2 items, or a constant input)."""
  from scipy import stats
  x, y = _check_pair(x, y, 'spearman')
  if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
    return math.nan
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    r = stats.spearmanr(np.asarray(x, float), np.asarray(y, float)).statistic
  return float(r) if np.isfinite(r) else math.nan


def position_bias_rate(verdicts: Sequence) -> float:
  """Fraction of pairwise verdicts whose pick flips when the pair is swapped (not consistent)."""
  if not verdicts:
    raise ValueError('position_bias_rate: expected at least one pairwise verdict, got none')
  return float(np.mean([not v.consistent for v in verdicts]))


def first_position_rate(verdicts: Sequence) -> float:
  """Share of all picks (2 per verdict: as given and swapped) that went to the response shown
  first; 0.5 is unbiased, 1.0 always picks A."""
  if not verdicts:
    raise ValueError('first_position_rate: expected at least one pairwise verdict, got none')
  return float(np.mean([v.first_position_picked / 2 for v in verdicts]))


def split_labelled(labelled: Sequence[dict], scale: Sequence[int]) -> tuple[list, list]:
  """(pointwise items, pairwise items), every label checked against its kind."""
  pointwise, pairwise = [], []
  for i, item in enumerate(labelled):
    if not isinstance(item, dict) or 'label' not in item:
      raise ValueError(f'labelled item {i}: expected a dict with a "label", got {item!r:.80}')
    if 'a' in item and 'b' in item:
      if item['label'] not in PAIR_LABELS:
        raise ValueError(f'labelled item {i}: pairwise label must be one of {PAIR_LABELS}, '
                         f'got {item["label"]!r}')
      pairwise.append(item)
    elif 'response' in item:
      if item['label'] not in scale:
        raise ValueError(f'labelled item {i}: pointwise label must be on the rubric scale '
                         f'{tuple(scale)}, got {item["label"]!r}')
      pointwise.append(item)
    else:
      raise ValueError(f'labelled item {i}: expected "response" (pointwise) or "a" and "b" '
                       '(pairwise) keys')
  return pointwise, pairwise


def meta_evaluate(judge, labelled: Sequence[dict]) -> dict:
  """The judge run on every labelled item (one `score` and one `compare` call) and compared with
  the labels. Headline 'agreement'/'kappa' are the pairwise ones when there are pairwise items,
  else the pointwise ones ('kappa_source' says which); 'spearman' ranks the judge's expected
  score against pointwise labels. Rates and correlations are nan where they have no items."""
  scale = judge.rubric.scale
  pointwise, pairwise = split_labelled(labelled, scale)
  if not pointwise and not pairwise:
    raise ValueError('meta_evaluate: the labelled set is empty')
  nan = math.nan
  report = dict(judge=judge.name, rubric=judge.rubric.name, n=len(pointwise) + len(pairwise),
                n_pointwise=len(pointwise), n_pairwise=len(pairwise), pointwise_agreement=nan,
                pointwise_kappa=nan, pointwise_kappa_quadratic=nan, spearman=nan,
                pairwise_agreement=nan, pairwise_kappa=nan, position_bias_rate=nan,
                first_position_rate=nan, n_truncated=0)
  if pointwise:
    verdicts = judge.score(pointwise)
    got, want = [v.score for v in verdicts], [item['label'] for item in pointwise]
    report.update(
        pointwise_agreement=agreement(got, want), pointwise_kappa=cohen_kappa(got, want, scale),
        pointwise_kappa_quadratic=cohen_kappa(got, want, scale, weights='quadratic'),
        spearman=spearman([v.expected for v in verdicts], want))
    report['n_truncated'] += sum(v.truncated for v in verdicts)
  if pairwise:
    verdicts = judge.compare(pairwise)
    got, want = [v.winner for v in verdicts], [item['label'] for item in pairwise]
    report.update(pairwise_agreement=agreement(got, want),
                  pairwise_kappa=cohen_kappa(got, want, PAIR_LABELS),
                  position_bias_rate=position_bias_rate(verdicts),
                  first_position_rate=first_position_rate(verdicts))
    report['n_truncated'] += sum(v.truncated for v in verdicts)
  source = 'pairwise' if pairwise else 'pointwise'
  report.update(kappa_source=source, agreement=report[f'{source}_agreement'],
                kappa=report[f'{source}_kappa'])
  return report


def format_report(report: dict) -> str:
  """The report as one block of text, kappa and the position-bias rate on their own lines."""
  f = lambda x: 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.3f}'
  lines = [f"autorater meta-evaluation: judge {report.get('judge', '?')}, rubric "
           f"{report.get('rubric', '?')}, {report['n']} items ({report['n_pairwise']} pairwise, "
           f"{report['n_pointwise']} pointwise)",
           f"  Cohen's kappa     {f(report['kappa'])} ({report['kappa_source']}), agreement "
           f"{f(report['agreement'])}",
           f"  position bias     {f(report['position_bias_rate'])} of pairs flip when swapped; "
           f"first position picked {f(report['first_position_rate'])} of the time"]
  if report['n_pointwise'] and report['n_pairwise']:
    lines.append(f"  pairwise          kappa {f(report['pairwise_kappa'])}, agreement "
                 f"{f(report['pairwise_agreement'])}")
  if report['n_pointwise']:
    lines.append(f"  pointwise         kappa {f(report['pointwise_kappa'])} (quadratic "
                 f"{f(report['pointwise_kappa_quadratic'])}), agreement "
                 f"{f(report['pointwise_agreement'])}, Spearman {f(report['spearman'])}")
  if report.get('n_truncated'):
    lines.append(f"  warning: {report['n_truncated']} judge prompts were cut to fit the judge's "
                 'context (their rubric may be missing)')
  return '\n'.join(lines)


# ---- a labelled set with known answers --------------------------------------------------------
def _wrong(answer: int, rng: np.random.Generator) -> int:
  """A plausible mistake: off by one or ten, or the last two digits swapped."""
  options = [answer + 1, answer - 1, answer + 10, answer - 10]
  digits = str(abs(answer))
  if len(digits) >= 2 and digits[-1] != digits[-2]:
    options.append(int(('-' if answer < 0 else '') + digits[:-2] + digits[-1] + digits[-2]))
  return int(rng.choice([o for o in options if o != answer]))


def reference_labelled_set(n: int = 100, seed: int = 0) -> list[dict]:
  """`n` arithmetic questions ("What is 37 + 48?"), each giving one pairwise item (the correct
  and a plausibly wrong answer; the correct one is `a` for exactly half the items, in a seeded
  order; label = the correct one) then one pointwise item (correct -> label 5, wrong -> 1, half
  each). Reference answers stand in for human labels; every item keeps its `answer`."""
  if n < 1:
    raise ValueError(f'reference_labelled_set: n must be >= 1, got {n}')
  rng = np.random.default_rng(seed)
  correct_first = rng.permutation(np.arange(n) % 2 == 0)
  pointwise_correct = rng.permutation(np.arange(n) % 2 == 1)
  items = []
  for i in range(n):
    x, y = (int(v) for v in rng.integers(10, 100, size=2))
    op = ('+', '-', '*')[int(rng.integers(3))]
    answer = {'+': x + y, '-': x - y, '*': x * y}[op]
    prompt = f'What is {x} {op} {y}?'
    right, wrong = f'{x} {op} {y} = {answer}.', f'{x} {op} {y} = {_wrong(answer, rng)}.'
    a, b = (right, wrong) if correct_first[i] else (wrong, right)
    items.append(dict(prompt=prompt, a=a, b=b, label='a' if correct_first[i] else 'b',
                      answer=answer))
    ok = bool(pointwise_correct[i])
    items.append(dict(prompt=prompt, response=right if ok else wrong, label=5 if ok else 1,
                      answer=answer))
  return items

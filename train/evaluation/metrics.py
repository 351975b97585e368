"""Per-example metrics for evaluation tasks, and bootstrap intervals over examples.

Each metric maps one example's response(s) to a float; a task's score is the mean over examples,
reported with a percentile bootstrap interval (Efron & Tibshirani 1993) so that two runs or two
prompting styles can be compared honestly on a few hundred items.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Callable, Sequence

import numpy as np

NUMBER = r'-?\d[\d,]*(?:\.\d+)?'


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation (Rajpurkar et al. 2016): lower case, no punctuation, no articles,
  single spaces."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
  p = normalize_answer(prediction)
  return float(any(p == normalize_answer(r) for r in references))


def extract_answer(text: str, patterns: Sequence[str]) -> str:
  """The first group of the first pattern that matches (searched in order), stripped; '' when
  none does. Chain-of-thought responses put the answer after the reasoning, so tasks list the
  explicit form first ("The answer is N") and fall back to, e.g., the last number."""
  for pattern in patterns:
    if pattern == 'last_number':
      found = re.findall(NUMBER, text)
      if found:
        return found[-1].replace(',', '')
      continue
    m = re.search(pattern, text)
    if m:
      return (m.group(1) if m.groups() else m.group(0)).strip()
  return ''


def token_f1(prediction: str, references: Sequence[str]) -> float:
  """SQuAD token F1, the best over references."""
  best = 0.0
  pred = normalize_answer(prediction).split()
  for ref in references:
    gold = normalize_answer(ref).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if not pred or not gold:
      best = max(best, float(pred == gold))
    elif same:
      p, r = same / len(pred), same / len(gold)
      best = max(best, 2 * p * r / (p + r))
  return best


_ROUGE = None


def rouge_l(prediction: str, references: Sequence[str]) -> float:
  """ROUGE-L F-measure (Lin 2004), the best over references, by Google's `rouge-score` package
  (the implementation papers report), with its stemmer."""
  global _ROUGE
  if _ROUGE is None:
    from rouge_score import rouge_scorer
    _ROUGE = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
  return max(_ROUGE.score(r, prediction)['rougeL'].fmeasure for r in references)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, "Evaluating Large Language
  Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), in the product form that stays
  stable for large n."""
  if not 0 <= c <= n or k < 1:
    raise ValueError(f'pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}')
  if k > n:
    raise ValueError(f'pass@{k} needs at least {k} samples per problem, got n={n}')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of `statistic` over examples (deterministic for a seed)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return (math.nan, math.nan)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, x.size, size=(resamples, x.size))
  stats = np.array([statistic(x[i]) for i in idx])
  lo = (1 - confidence) / 2
  return (float(np.quantile(stats, lo)), float(np.quantile(stats, 1 - lo)))


def summarize(values: Sequence[float], seed: int = 0) -> dict:
  """{'mean', 'ci_low', 'ci_high', 'n'} of per-example values."""
  x = np.asarray(values, np.float64)
  lo, hi = bootstrap_ci(x, seed=seed)
  return {'mean': float(x.mean()) if x.size else math.nan, 'ci_low': lo, 'ci_high': hi,
          'n': int(x.size)}


def code_exact(prediction: str, references: Sequence[str]) -> float:
  """The code exactly, up to trailing whitespace on each line and at the ends."""
  norm = lambda t: '\n'.join(line.rstrip() for line in t.strip('\n').splitlines())
  return float(any(norm(prediction) == norm(r) for r in references))


def parses_as_body(prediction: str, references: Sequence[str] = ()) -> float:
  """Whether `prediction` is a syntactically valid function body (Python's own parser)."""
  import ast
  try:
    ast.parse('def _f():\n' + prediction)
  except (SyntaxError, ValueError):
    return 0.0
  return 1.0


# Generation metrics by name: (prediction, references) -> float. A task lists the ones it reports.
GENERATION_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    'exact_match': exact_match,
    'f1': token_f1,
    'rouge_l': rouge_l,
    'code_exact': code_exact,
    'parses': parses_as_body,
}

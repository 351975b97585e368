"""Best-of-N and rejection sampling: N samples per prompt from a policy, scored
(train/rewards.py), the best kept.

    picks = best_of_n(policy, prompts, n=8, score=make_scorer('reward:runs/rm'), gen=...)
    picks[i].best, picks[i].score, picks[i].scores            # scores: one per sample

`curve(picks, metric)` is best-of-N's value as N grows: for each N' <= N, the mean over prompts
of `metric` (e.g. the task's rule) on the best-scored of the first N' samples. Rejection
sampling (DeepSeek-R1 §2.3.3, Llama 2 §3.2.2) keeps the picks whose score clears a threshold as
new SFT records (`launch.rejection_sample`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


@dataclasses.dataclass
class Pick:
  prompt: str
  samples: list[str]
  scores: list[float | None]     # None: the scorer failed on that sample
  reference: Any = None          # the prompt's answer or tests, for rules that read one

  @property
  def best_index(self) -> int | None:
    """The first sample with the highest score (None if every sample failed)."""
    valid = [(s, -i) for i, s in enumerate(self.scores) if s is not None]
    return -max(valid)[1] if valid else None

  @property
  def best(self) -> str | None:
    i = self.best_index
    return None if i is None else self.samples[i]

  @property
  def score(self) -> float | None:
    i = self.best_index
    return None if i is None else self.scores[i]


def best_of_n(policy, prompts: Sequence[str], n: int, score, gen, log=print,
              references: Sequence | None = None) -> list[Pick]:
  """`n` samples per prompt (`gen`: train/evaluation/lm.py Generation, its n is replaced),
  scored by `score(prompts, completions, references) -> (scores, failures)` (`references`: one
  per prompt, for rules such as exact_match); failures are logged, one line each, and those
  samples never win."""
  if n < 1:
    raise ValueError(f'--n={n}: expected at least 1 sample per prompt')
  samples = policy.generate(list(prompts), dataclasses.replace(gen, n=n))
  flat_p = [p for p, ss in zip(prompts, samples) for _ in ss]
  flat_c = [c for ss in samples for c in ss]
  refs = None if references is None else [r for r, ss in zip(references, samples) for _ in ss]
  scores, failures = score(flat_p, flat_c, refs)
  for f in failures:
    log(f'scoring failed for prompt {f.index // n} sample {f.index % n}: {f.reason}')
  return [Pick(p, list(ss), list(scores[i * n:(i + 1) * n]),
               None if references is None else references[i])
          for i, (p, ss) in enumerate(zip(prompts, samples))]


def curve(picks: Sequence[Pick], metric: Callable[..., float]) -> list[tuple[int, float]]:
  """[(N', mean metric of the best-scored among the first N' samples)] for N' = 1, 2, 4, ...
  up to the samples drawn (the best scored, not the best by the metric: what best-of-N gets).
  `metric(prompt, completion, reference)` is a rule (train/rewards.py)."""
  n = min(len(p.samples) for p in picks)
  out, k = [], 1
  while k <= n:
    values = []
    for p in picks:
      head = Pick(p.prompt, p.samples[:k], p.scores[:k])
      values.append(metric(p.prompt, head.best, p.reference) if head.best is not None else 0.0)
    out.append((k, sum(values) / max(len(values), 1)))
    k *= 2
  return out


def preference_pairs(picks: Sequence[Pick]) -> list[dict]:
  """{"prompt", "chosen", "rejected", "margin"} per prompt whose best and worst scored samples
  differ in score and text: the scorer's labels as preference data (empty samples skipped:
  a preference record needs text on both sides)."""
  out = []
  for p in picks:
    valid = [(s, i) for i, s in enumerate(p.scores) if s is not None and p.samples[i].strip()]
    if len(valid) < 2:
      continue
    (lo, i_lo), (hi, i_hi) = min(valid), max(valid)
    if hi > lo and p.samples[i_hi] != p.samples[i_lo]:
      out.append({'prompt': p.prompt, 'chosen': p.samples[i_hi], 'rejected': p.samples[i_lo],
                  'margin': 0.0})
  return out

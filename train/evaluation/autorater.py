"""Autoraters: a judge model scores one response against a rubric, or picks between two.

Any `EvalModel` judges (a palmax workdir, an imported checkpoint, an API adapter). The verdict is
read from the judge's log-likelihoods, not parsed from free text, so it is always well formed:

    judge = Judge(PalmaxModel.load('runs/judge'), CORRECTNESS)
    judge.score([dict(prompt='What is 2 + 2?', response='4')])      # -> [PointwiseVerdict]
    judge.compare([dict(prompt='What is 2 + 2?', a='4', b='5')])     # -> [PairwiseVerdict]

Pointwise: the judge prompt ends in "Score:" and each allowed score " 1".." 5" is scored as its
continuation; the softmax over those log-likelihoods is the score distribution. Pairwise: the
prompt ends in "Better:" and " A" is scored against " B", once as given and once with the two
responses swapped, so a judge that prefers a position rather than a response shows as a tie.
Each method makes one batched `loglikelihood` call and (unless `rationale_tokens=0`) one batched
`generate` call for a short greedy rationale that explains the verdict already chosen.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from train.evaluation.lm import EvalModel, Generation, cut_at


@dataclasses.dataclass(frozen=True)
class Rubric:
  """What the judge grades (`criteria`, shown verbatim) and the integer scores it may give."""
  name: str
  criteria: str
  scale: tuple[int, ...] = (1, 2, 3, 4, 5)

  def __post_init__(self):
    if not self.name or not self.criteria.strip():
      raise ValueError('Rubric: name and criteria must be non-empty')
    scale = tuple(self.scale)
    if (len(scale) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in scale)
        or len(set(scale)) != len(scale) or list(scale) != sorted(scale)):
      raise ValueError(f'Rubric {self.name!r}: scale must be >= 2 distinct increasing integers, '
                       f'got {self.scale!r}')
    object.__setattr__(self, 'scale', scale)


HELPFULNESS = Rubric('helpfulness', 'Does the response address the request directly, completely '
                     'and clearly? 5 = fully helpful, 1 = unhelpful or off topic.')
CORRECTNESS = Rubric('correctness', 'Is the response factually and mathematically correct? '
                     '5 = entirely correct, 1 = wrong.')
RUBRICS = {r.name: r for r in (HELPFULNESS, CORRECTNESS)}

POINTWISE_TEMPLATE = ('Grade the response. Criteria ({name}): {criteria}\n'
                      'Answer with one score from {scale}.\n\n'
                      'Prompt: {prompt}\nResponse: {response}\nScore:')
PAIRWISE_TEMPLATE = ('Compare two responses. Criteria ({name}): {criteria}\n'
                     'Answer A or B, whichever response is better.\n\n'
                     'Prompt: {prompt}\nResponse A: {a}\nResponse B: {b}\nBetter:')
CHOICES = (' A', ' B')


@dataclasses.dataclass
class PointwiseVerdict:
  """`score`: the most likely allowed score; `probs[i]`: p(scale[i]) normalised over the scale;
  `expected`: sum_i probs[i] * scale[i]; `prompt`: the exact judge prompt scored (`truncated`
  when its start was cut to fit the judge's context); `rationale`: '' when not asked for."""
  score: int
  expected: float
  probs: tuple[float, ...]
  rationale: str
  prompt: str
  truncated: bool = False


@dataclasses.dataclass
class PairwiseVerdict:
  """`winner`: 'a' or 'b' when both orders agree, else 'tie'; `p_a`: mean over the two orders of
  p(`a` is better) normalised over {A, B}; `first_position_picked`: how many of the 2 orders
  (0..2) picked whichever response was shown first; `prompts`: (as given, swapped); the
  rationale explains the as-given order's pick."""
  winner: str
  p_a: float
  consistent: bool
  first_position_picked: int
  rationale: str
  prompts: tuple[str, str]
  truncated: bool = False


def _softmax(logp: np.ndarray) -> np.ndarray:
  z = np.exp(logp - logp.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def _field(item, key: str, i: int) -> str:
  if not isinstance(item, dict) or not isinstance(item.get(key), str):
    raise ValueError(f'item {i}: expected a dict with a string {key!r}, got {item!r:.80}')
  return item[key]


class Judge:
  """A model grading against a rubric. `rationale_tokens`: the rationale's length cap (0: none);
  it is clipped to half the judge's context when the model exposes `max_len`."""

  def __init__(self, model: EvalModel, rubric: Rubric = HELPFULNESS, rationale_tokens: int = 64):
    if rationale_tokens < 0:
      raise ValueError(f'rationale_tokens must be >= 0, got {rationale_tokens}')
    self.model, self.rubric, self.rationale_tokens = model, rubric, rationale_tokens

  @property
  def name(self) -> str:
    return getattr(self.model, 'name', type(self.model).__name__)

  # ---- prompts ----------------------------------------------------------------------------
  def pointwise_prompt(self, prompt: str, response: str) -> str:
    r = self.rubric
    scale = ', '.join(str(s) for s in r.scale)
    return POINTWISE_TEMPLATE.format(name=r.name, criteria=r.criteria, scale=scale,
                                     prompt=prompt, response=response)

  def pairwise_prompt(self, prompt: str, a: str, b: str) -> str:
    r = self.rubric
    return PAIRWISE_TEMPLATE.format(name=r.name, criteria=r.criteria, prompt=prompt, a=a, b=b)

  def fit(self, text: str, continuations: Sequence[str]) -> tuple[str, bool]:
    """(`text`, False), or its end and True when it and the longest continuation overflow the
    judge's context: the closing question and the responses matter most, the rubric's opening
    words least. Only models exposing `tokenizer` and `max_len` (PalmaxModel) are checked."""
    tok, max_len = getattr(self.model, 'tokenizer', None), getattr(self.model, 'max_len', None)
    if tok is None or not max_len:
      return text, False
    room = max_len - max(len(tok.encode(c)) for c in continuations)  # Scorer adds doc start.
    if room < 1:
      raise ValueError(f'judge context of {max_len} tokens leaves no room for a prompt')
    truncated = False
    while True:
      excess = len(tok.encode(text)) - room
      if excess <= 0:
        return text, truncated
      text, truncated = text[excess:], True   # A token spans >= 1 character: no overshoot.

  def _rationales(self, prompts: Sequence[str]) -> list[str]:
    if not self.rationale_tokens or not prompts:
      return [''] * len(prompts)
    max_tokens = self.rationale_tokens
    max_len = getattr(self.model, 'max_len', None)
    if max_len:
      max_tokens = max(1, min(max_tokens, max_len // 2))
    gen = Generation(max_tokens=max_tokens, until=('\n\n',))
    # Cut here too: a model (an API adapter) may not honour `until` itself.
    return [cut_at(o[0], gen.until).strip() for o in self.model.generate(list(prompts), gen)]

  # ---- verdicts ---------------------------------------------------------------------------
  def score(self, items: Sequence[dict]) -> list[PointwiseVerdict]:
    """One verdict per item {prompt, response}: one loglikelihood call for items x scale."""
    conts = [f' {s}' for s in self.rubric.scale]
    prompts, cut = [], []
    for i, item in enumerate(items):
      text, t = self.fit(self.pointwise_prompt(_field(item, 'prompt', i),
                                               _field(item, 'response', i)), conts)
      prompts.append(text)
      cut.append(t)
    if not prompts:
      return []
    scores = self.model.loglikelihood([(p, c) for p in prompts for c in conts])
    logp_NS = np.array([lp for lp, _ in scores], np.float64).reshape(len(prompts), len(conts))
    probs_NS = _softmax(logp_NS)
    best = probs_NS.argmax(-1)   # Ties go to the lower score.
    scale = np.array(self.rubric.scale, np.float64)
    rationales = self._rationales([f'{p}{conts[b]}\nRationale:' for p, b in zip(prompts, best)])
    return [PointwiseVerdict(score=self.rubric.scale[b], expected=float(probs_NS[n] @ scale),
                             probs=tuple(float(x) for x in probs_NS[n]), rationale=rationales[n],
                             prompt=prompts[n], truncated=cut[n])
            for n, b in enumerate(best)]

  def compare(self, items: Sequence[dict]) -> list[PairwiseVerdict]:
    """One verdict per item {prompt, a, b}: each asked as given and swapped, in one
    loglikelihood call of items x 2 orders x {A, B}."""
    prompts, cut = [], []
    for i, item in enumerate(items):
      p, a, b = (_field(item, k, i) for k in ('prompt', 'a', 'b'))
      given, t1 = self.fit(self.pairwise_prompt(p, a, b), CHOICES)
      swapped, t2 = self.fit(self.pairwise_prompt(p, b, a), CHOICES)
      prompts.append((given, swapped))
      cut.append(t1 or t2)
    if not prompts:
      return []
    pairs = [(p, c) for both in prompts for p in both for c in CHOICES]
    logp_NOC = np.array([lp for lp, _ in self.model.loglikelihood(pairs)],
                        np.float64).reshape(len(prompts), 2, 2)
    p_first_NO = _softmax(logp_NOC)[..., 0]       # p(the response shown as A is better)
    first_NO = p_first_NO >= 0.5                   # An exact tie goes to the first position.
    p_a_N = (p_first_NO[:, 0] + 1.0 - p_first_NO[:, 1]) / 2   # Swapped: a is shown as B.
    rationales = self._rationales(
        [f'{given}{CHOICES[0] if f else CHOICES[1]}\nRationale:'
         for (given, _), f in zip(prompts, first_NO[:, 0])])
    out = []
    for n, (f_given, f_swapped) in enumerate(first_NO):
      pick_given, pick_swapped = ('a' if f_given else 'b'), ('b' if f_swapped else 'a')
      consistent = pick_given == pick_swapped
      out.append(PairwiseVerdict(
          winner=pick_given if consistent else 'tie', p_a=float(p_a_N[n]), consistent=consistent,
          first_position_picked=int(f_given) + int(f_swapped), rationale=rationales[n],
          prompts=prompts[n], truncated=cut[n]))
    return out

"""Judge: prompts, batching, pointwise scores and pairwise verdicts with a swap, on fake models
whose preferences are known; and a smoke test on a real (tiny) palmax model."""
import math
import re

import numpy as np
import pytest

from train.evaluation import autorater
from train.evaluation.autorater import CORRECTNESS, Judge, Rubric
from train.evaluation.calibration import format_report, meta_evaluate, reference_labelled_set


def solve(text: str) -> int:
  x, op, y = re.search(r'What is (-?\d+) ([-+*]) (-?\d+)\?', text).groups()
  return {'+': int(x) + int(y), '-': int(x) - int(y), '*': int(x) * int(y)}[op]


def claims(response: str) -> int:
  return int(re.search(r'= (-?\d+)\.', response).group(1))


class FakeModel:
  """Log-likelihoods from a rule; records every call so batching can be checked."""
  name = 'fake'

  def __init__(self, rule):
    self.rule, self.calls, self.generated = rule, [], []

  def loglikelihood(self, pairs):
    self.calls.append(list(pairs))
    return [(float(self.rule(ctx, cont)), False) for ctx, cont in pairs]

  def loglikelihood_rolling(self, texts):
    raise NotImplementedError

  def generate(self, prompts, gen):
    self.generated.append((list(prompts), gen))
    return [['because it adds up.\n\nignored'] for _ in prompts]


def correct_rule(ctx, cont):
  """Prefers the correct answer wherever it is shown; grades correct 5 and wrong 1."""
  answer = solve(ctx)
  if cont in (' A', ' B'):
    shown = re.search(r'Response A: (.*)\nResponse B: (.*)\nBetter:$', ctx).groups()
    return 0.0 if claims(shown[cont == ' B']) == answer else -5.0
  ok = claims(re.search(r'Response: (.*)\nScore:$', ctx).group(1)) == answer
  return 0.0 if cont == (' 5' if ok else ' 1') else -5.0


def always_a(ctx, cont):
  return {' A': -0.1, ' B': -3.0}.get(cont, -1.0)


def test_rubric_validation():
  assert Rubric('x', 'crit', (1, 2)).scale == (1, 2)
  for scale in [(1,), (2, 1), (1, 1, 2), (1, 2.5), ()]:
    with pytest.raises(ValueError, match='scale'):
      Rubric('x', 'crit', scale)
  with pytest.raises(ValueError, match='non-empty'):
    Rubric('x', ' ')
  assert set(autorater.RUBRICS) >= {'helpfulness', 'correctness'}


def test_score_one_batched_call_probs_and_rationale():
  model = FakeModel(correct_rule)
  judge = Judge(model, CORRECTNESS, rationale_tokens=16)
  items = [dict(prompt='What is 2 + 3?', response='2 + 3 = 5.'),
           dict(prompt='What is 2 + 3?', response='2 + 3 = 6.'),
           dict(prompt='What is 9 * 9?', response='9 * 9 = 81.')]
  verdicts = judge.score(items)
  assert len(model.calls) == 1 and len(model.calls[0]) == 3 * 5
  assert [v.score for v in verdicts] == [5, 1, 5]
  p_top = 1 / (1 + 4 * math.exp(-5))
  for v in verdicts:
    assert math.isclose(sum(v.probs), 1.0) and math.isclose(max(v.probs), p_top)
    assert math.isclose(v.expected, float(np.dot(v.probs, CORRECTNESS.scale)))
    assert v.rationale == 'because it adds up.' and not v.truncated
    assert CORRECTNESS.criteria in v.prompt and v.prompt.endswith('Score:')
  assert items[1]['response'] in verdicts[1].prompt
  assert {c for _, c in model.calls[0]} == {' 1', ' 2', ' 3', ' 4', ' 5'}
  (prompts, gen), = model.generated   # One generate call, greedy, cut at a blank line.
  assert len(prompts) == 3 and gen.temperature == 0 and gen.max_tokens == 16
  assert gen.until == ('\n\n',) and prompts[0] == verdicts[0].prompt + ' 5\nRationale:'


def test_compare_swaps_and_finds_the_winner():
  model = FakeModel(correct_rule)
  judge = Judge(model, CORRECTNESS, rationale_tokens=0)
  items = [dict(prompt='What is 4 + 4?', a='4 + 4 = 8.', b='4 + 4 = 9.'),
           dict(prompt='What is 4 + 4?', a='4 + 4 = 7.', b='4 + 4 = 8.')]
  verdicts = judge.compare(items)
  assert len(model.calls) == 1 and len(model.calls[0]) == 2 * 2 * 2 and not model.generated
  assert [v.winner for v in verdicts] == ['a', 'b']
  assert all(v.consistent and v.first_position_picked == 1 and v.rationale == ''
             for v in verdicts)
  p = 1 / (1 + math.exp(-5))
  assert math.isclose(verdicts[0].p_a, p) and math.isclose(verdicts[1].p_a, 1 - p)
  given, swapped = verdicts[0].prompts
  assert CORRECTNESS.criteria in given and given.endswith('Better:')
  assert 'Response A: 4 + 4 = 8.\nResponse B: 4 + 4 = 9.' in given
  assert 'Response A: 4 + 4 = 9.\nResponse B: 4 + 4 = 8.' in swapped   # Really swapped.


def test_position_biased_judge_ties_everywhere():
  judge = Judge(FakeModel(always_a), CORRECTNESS, rationale_tokens=0)
  verdicts = judge.compare([dict(prompt='What is 1 + 1?', a='1 + 1 = 2.', b='1 + 1 = 3.')] * 3)
  assert all(v.winner == 'tie' and not v.consistent and v.first_position_picked == 2
             for v in verdicts)
  assert math.isclose(verdicts[0].p_a, 0.5)
  report = meta_evaluate(judge, reference_labelled_set(n=20, seed=1))
  assert report['position_bias_rate'] == 1.0 and report['first_position_rate'] == 1.0
  assert report['pairwise_agreement'] == 0.0


def test_correct_judge_is_calibrated_on_the_reference_set():
  report = meta_evaluate(Judge(FakeModel(correct_rule), CORRECTNESS, rationale_tokens=0),
                         reference_labelled_set(n=30))
  assert report['n'] == 60 and report['n_pairwise'] == report['n_pointwise'] == 30
  assert report['kappa'] == 1.0 and report['pointwise_kappa'] == 1.0
  assert report['agreement'] == 1.0 and report['position_bias_rate'] == 0.0
  assert report['first_position_rate'] == 0.5 and report['spearman'] > 0.99
  text = format_report(report)
  assert 'kappa' in text and 'position bias' in text and '1.000' in text


def test_bad_items_and_empty_input():
  judge = Judge(FakeModel(correct_rule), CORRECTNESS)
  assert judge.score([]) == [] and judge.compare([]) == []
  with pytest.raises(ValueError, match="item 1: expected a dict with a string 'response'"):
    judge.score([dict(prompt='What is 1 + 1?', response='2'), dict(prompt='p')])
  with pytest.raises(ValueError, match="item 0: .* 'b'"):
    judge.compare([dict(prompt='p', a='x')])
  with pytest.raises(ValueError, match='rationale_tokens'):
    Judge(judge.model, CORRECTNESS, rationale_tokens=-1)


class CharTokenizer:
  def encode(self, text):
    return [ord(c) for c in text]


def test_fit_keeps_the_end_of_a_long_prompt():
  model = FakeModel(always_a)
  model.tokenizer, model.max_len = CharTokenizer(), 60
  judge = Judge(model, CORRECTNESS, rationale_tokens=100)
  v, = judge.compare([dict(prompt='What is 1 + 1?', a='x' * 10, b='y' * 10)])
  assert v.truncated and all(len(p) == 58 and p.endswith('Better:') for p in v.prompts)
  assert 'Response A: ' + 'x' * 10 in v.prompts[0]
  assert model.generated[0][1].max_tokens == 30   # Clipped to half the context.


def test_launch_eval_autorater_report():
  # What `launch.eval --autorater=reference --limit=6` prints for its judge.
  from train.evaluation import runner
  out = runner.meta_evaluate_judge(FakeModel(correct_rule), limit=6)
  assert "Cohen's kappa     1.000" in out and 'position bias     0.000' in out


@pytest.mark.slow
def test_real_model_meta_evaluation(trained_workdir):
  from train.evaluation.lm import PalmaxModel
  model = PalmaxModel.load(trained_workdir[0], serve_overrides=dict(num_slots=4, max_queue=64))
  try:
    judge = Judge(model, CORRECTNESS, rationale_tokens=4)
    report = meta_evaluate(judge, reference_labelled_set(n=8))
    v, = judge.score([dict(prompt='What is 1 + 1?', response='2')])
  finally:
    model.close()
  assert report['n'] == 16 and report['n_truncated'] == 16   # A 64-token judge: cut prompts.
  for key in ('agreement', 'pairwise_agreement', 'pointwise_agreement', 'position_bias_rate',
              'first_position_rate'):
    assert 0.0 <= report[key] <= 1.0, key
  for key in ('kappa', 'pointwise_kappa', 'spearman'):
    assert math.isfinite(report[key]) and -1.0 <= report[key] <= 1.0, key
  assert v.score in CORRECTNESS.scale and isinstance(v.rationale, str)
  assert 1.0 <= v.expected <= 5.0 and math.isclose(sum(v.probs), 1.0, rel_tol=1e-6)
  text = format_report(report)
  assert 'kappa' in text and 'position bias' in text

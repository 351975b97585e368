"""Best-of-N picks the best-scored sample, a failing or hanging scorer fails one sample (logged)
and never the run, and the curve over N uses what best-of-N would have chosen."""
import time

import pytest

from train import best_of_n, rewards
from train.evaluation.lm import Generation


class FakePolicy:
  """Generates fixed samples: prompt i's sample j is SAMPLES[(i + j) % len(SAMPLES)]."""
  SAMPLES = ['    return x\n', '    return (x\n', '    if x:\n        return 1\n', 'oops(\n']

  def __init__(self):
    self.calls = []

  def generate(self, prompts, gen):
    self.calls.append(gen)
    return [[self.SAMPLES[(i + j) % len(self.SAMPLES)] for j in range(gen.n)]
            for i in range(len(prompts))]


def test_best_is_the_highest_score_and_the_curve_rises_with_n():
  policy = FakePolicy()
  score = rewards.make_scorer('rule:parses')
  picks = best_of_n.best_of_n(policy, ['a', 'b', 'c', 'd'], 4, score, Generation(max_tokens=8))
  assert policy.calls[0].n == 4
  for p in picks:
    assert p.score == max(p.scores) == 1.0 and rewards.parses('', p.best) == 1.0
  # One sample: two of the four prompts start on a body that does not parse; two: every prompt
  # has a parsing one among them.
  assert best_of_n.curve(picks, rewards.parses) == [(1, 0.5), (2, 1.0), (4, 1.0)]


def test_a_rule_with_references_checks_each_prompts_own_answer():
  class Numbers:
    def generate(self, prompts, gen):
      return [[str(j) for j in range(gen.n)] for _ in prompts]
  picks = best_of_n.best_of_n(Numbers(), ['1 + 1?', '1 + 2?'], 4,
                              rewards.make_scorer('rule:exact_match'), Generation(max_tokens=2),
                              references=['2', '3'])
  assert [p.best for p in picks] == ['2', '3'] and [p.reference for p in picks] == ['2', '3']
  assert best_of_n.curve(picks, rewards.exact_match) == [(1, 0.0), (2, 0.0), (4, 1.0)]
  with pytest.raises(ValueError, match='exact_match needs the prompt'):
    rewards.exact_match('1 + 1?', '2')


def test_a_rule_that_raises_or_hangs_fails_only_its_sample():
  def flaky(prompt, completion):
    if 'oops' in completion:
      raise RuntimeError('bad sample')
    if 'if x' in completion:
      time.sleep(5)
    return float(len(completion))

  lines = []
  scorer = rewards.RuleScorer(flaky, timeout_s=0.5)
  picks = best_of_n.best_of_n(FakePolicy(), ['a'], 4, scorer, Generation(max_tokens=8),
                              log=lines.append)
  assert picks[0].scores[2] is None and picks[0].scores[3] is None
  assert picks[0].best == '    return (x\n'   # The longest that scored.
  assert any('RuntimeError: bad sample' in x for x in lines)
  assert any('timed out after 0.5 s' in x for x in lines)


def test_all_failed_means_no_pick():
  scorer = rewards.RuleScorer(lambda p, c: 1 / 0, timeout_s=1)
  picks = best_of_n.best_of_n(FakePolicy(), ['a'], 2, scorer, Generation(), log=lambda _: None)
  assert picks[0].best is None and picks[0].score is None
  assert best_of_n.curve(picks, rewards.parses) == [(1, 0.0), (2, 0.0)]


@pytest.mark.parametrize('spec,message', [
    ('rule:nope', "no reward rule 'nope'"), ('reward:', "expected 'reward:WORKDIR'"),
    ('logprob', 'needs the policy model'), ('judge:', "expected 'judge:WORKDIR"),
    ('critic:x', "expected 'rule:NAME'"),
    ('rule:tests.no_such_module:fn', "'tests.no_such_module:fn': cannot import it"),
    ('rule:tests.train.rl.reward_rules:nope', "cannot import it .AttributeError")])
def test_bad_scorer_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    rewards.make_scorer(spec)


def test_a_rule_from_your_own_module():
  spec = 'rule:tests.train.rl.reward_rules:spaces'
  rewards.check_spec(spec)
  scores, failures = rewards.make_scorer(spec)(['p', 'q'], ['a b', 'ab'])
  assert scores == [1 / 3, 0.0] and not failures


def test_preference_pairs_are_best_over_worst_and_skip_ties():
  picks = [best_of_n.Pick('p', ['a', 'b', 'c'], [0.1, 0.9, None]),
           best_of_n.Pick('q', ['a', 'a'], [1.0, 0.0]),     # Same text: no pair.
           best_of_n.Pick('r', ['a', 'b'], [0.5, 0.5])]     # Tied: no pair.
  assert best_of_n.preference_pairs(picks) == [
      {'prompt': 'p', 'chosen': 'b', 'rejected': 'a', 'margin': 0.0}]
  from train import preference_data as pd
  assert pd._kind(best_of_n.preference_pairs(picks)[0], 'x') == 'pair'   # pylint: disable=protected-access

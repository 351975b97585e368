"""Scoring sampled completions: rule rewards (a Python function per task), a trained reward
model, an AI judge with a rubric (RLAIF), or the policy's own log-probability, behind one
interface for best-of-N, rejection sampling and RL.

    score = make_scorer('reward:runs/tiny_rm')   # or 'rule:parses', 'judge:runs/j', 'logprob'
    scores, failures = score(prompts, completions)   # floats; a failed sample scores None

A rule is `fn(prompt, completion, reference=None) -> float` registered in RULES, or any such
function in your own code, named 'rule:my_pkg.my_rewards:fn' (TRL's reward_funcs without
editing palmax; every process of a multi-host run imports it). A rule that raises, or runs
past `timeout_s`, fails that sample only: it scores None and the failure is reported (the
caller logs it), never ending the run. A rule that may hang for good belongs in a subprocess
(train/evaluation/sandbox.py), as code execution does.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Sequence

RULES: dict[str, Callable[..., float]] = {}


def rule(name: str):
  """Decorator: registers `fn(prompt, completion, reference=None) -> float` as the rule `name`
  (`reference`: the prompt's own answer or tests, when its records carry one)."""
  def add(fn):
    if name in RULES and RULES[name] is not fn:
      raise ValueError(f'reward rule {name!r} is registered twice')
    RULES[name] = fn
    return fn
  return add


def find_rule(name: str) -> Callable[..., float]:
  """RULES[name], or `fn` of 'module:fn' imported. ValueError naming `name` otherwise."""
  if name in RULES:
    return RULES[name]
  module, _, attr = name.partition(':')
  if not attr:
    raise ValueError(f'no reward rule {name!r}; rules: {sorted(RULES)}, or MODULE:FUNCTION')
  import importlib
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'reward rule {name!r}: cannot import it ({type(e).__name__}: {e})') from None
  if not callable(fn):
    raise ValueError(f'reward rule {name!r} is not a function')
  return fn


@rule('parses')
def parses(prompt: str, completion: str, reference=None) -> float:
  """1.0 if the completion is a valid function body: the stdlib function task's own metric
  (train/evaluation/metrics.py)."""
  from train.evaluation.metrics import parses_as_body
  del prompt, reference
  return parses_as_body(completion)


@rule('exact_match')
def exact_match(prompt: str, completion: str, reference=None) -> float:
  """1.0 if the completion's answer (the text itself, else its last number) equals the
  reference: the arithmetic task's metric (DeepSeek-R1's accuracy reward)."""
  from train.evaluation.metrics import extract_answer, exact_match as match
  del prompt
  if reference is None:
    raise ValueError('exact_match needs the prompt\'s reference answer ("answer" in its record)')
  refs = [str(reference)]
  return max(match(completion, refs), match(extract_answer(completion, ('last_number',)), refs))


@rule('passes')
def passes(prompt: str, completion: str, reference=None) -> float:
  """1.0 if prompt + completion, followed by the reference's tests, runs clean in the sandbox
  (train/evaluation/sandbox.py: its own process, time and memory limits, no network)."""
  from train.evaluation import sandbox
  if reference is None:
    raise ValueError('passes needs the prompt\'s tests ("answer" in its record)')
  return float(sandbox.run_program(f'{prompt}{completion}\n\n{reference}\n').passed)


@dataclasses.dataclass
class Failure:
  index: int
  reason: str


class RuleScorer:
  """Runs a rule on each sample in worker threads; one bad sample fails alone."""

  def __init__(self, fn: Callable[[str, str], float], timeout_s: float = 10.0, workers: int = 4):
    self.fn, self.timeout_s = fn, timeout_s
    self._pool = concurrent.futures.ThreadPoolExecutor(workers)

  def __call__(self, prompts: Sequence[str], completions: Sequence[str],
               references: Sequence | None = None):
    if references is None:
      futures = [self._pool.submit(self.fn, p, c) for p, c in zip(prompts, completions)]
    else:
      futures = [self._pool.submit(self.fn, p, c, r)
                 for p, c, r in zip(prompts, completions, references)]
    scores, failures = [], []
    for i, f in enumerate(futures):
      try:
        scores.append(float(f.result(timeout=self.timeout_s)))
      except concurrent.futures.TimeoutError:
        scores.append(None)
        failures.append(Failure(i, f'timed out after {self.timeout_s:g} s'))
      except Exception as e:   # pylint: disable=broad-except  (any rule bug fails one sample)
        scores.append(None)
        failures.append(Failure(i, f'{type(e).__name__}: {e}'))
    return scores, failures


class RewardModelScorer:
  def __init__(self, workdir: str):
    from train.reward_scorer import RewardScorer
    self.model = RewardScorer.from_workdir(workdir)

  def __call__(self, prompts, completions, references=None):
    del references   # A reward model judges the response alone.
    ok, failures = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
      try:
        self.model.ids(p, c)
        ok.append(i)
      except ValueError as e:   # This sample cannot be read as a response: it alone fails.
        failures.append(Failure(i, str(e)))
    scores: list = [None] * len(prompts)
    values = self.model.score([(prompts[i], completions[i]) for i in ok]) if ok else []
    for i, v in zip(ok, values):
      scores[i] = float(v)
    return scores, failures


class LogprobScorer:
  """The mean log-probability per token of each completion under the policy (an EvalModel,
  train/evaluation/lm.py): OpenAI's best_of criterion."""

  def __init__(self, policy):
    self.policy = policy

  def __call__(self, prompts, completions, references=None):
    del references
    out = self.policy.loglikelihood(list(zip(prompts, completions)))
    lengths = [max(1, len(self.policy.tokenizer.encode(c))) for c in completions]
    return [float(lp) / n for (lp, _), n in zip(out, lengths)], []


class JudgeScorer:
  """RL from AI feedback (Bai et al. 2022; Lee et al. 2023): a judge model grades each sample
  against a rubric (train/evaluation/autorater.py); the score is its expected grade."""

  def __init__(self, judge_workdir: str, rubric: str = 'helpfulness'):
    from train.evaluation import autorater
    from train.evaluation.lm import PalmaxModel
    if rubric not in autorater.RUBRICS:
      raise ValueError(f'judge rubric {rubric!r}; expected one of {sorted(autorater.RUBRICS)}')
    self.model = PalmaxModel.load(judge_workdir)
    self.judge = autorater.Judge(self.model, autorater.RUBRICS[rubric], rationale_tokens=0)

  def __call__(self, prompts, completions, references=None):
    del references
    verdicts = self.judge.score([{'prompt': p, 'response': c}
                                 for p, c in zip(prompts, completions)])
    return [float(v.expected) for v in verdicts], []


def check_spec(spec: str) -> None:
  """ValueError naming `spec` unless it names a scorer (nothing is loaded)."""
  kind, _, arg = spec.partition(':')
  if kind == 'rule':
    try:
      find_rule(arg)
    except ValueError as e:
      raise ValueError(f'{spec!r}: {e}') from None
  if kind in ('reward', 'judge') and not arg.partition(':')[0]:
    raise ValueError(f"{spec!r}: expected '{kind}:WORKDIR'")
  if kind not in ('rule', 'reward', 'judge', 'logprob') or (kind == 'logprob' and arg):
    raise ValueError(f"{spec!r}: expected 'rule:NAME', 'reward:WORKDIR', "
                     "'judge:WORKDIR[:RUBRIC]' or 'logprob'")


def make_scorer(spec: str, policy=None, timeout_s: float = 10.0):
  """A scorer from 'rule:NAME', 'reward:WORKDIR', 'judge:WORKDIR[:RUBRIC]' or 'logprob' (needs
  `policy`, an EvalModel: train/evaluation/lm.py's PalmaxModel). ValueError naming the spec
  otherwise."""
  kind, _, arg = spec.partition(':')
  if kind == 'judge':
    workdir, _, rubric = arg.partition(':')
    if not workdir:
      raise ValueError(f"--scorer={spec!r}: expected 'judge:WORKDIR[:RUBRIC]'")
    return JudgeScorer(workdir, rubric or 'helpfulness')
  if kind == 'rule':
    try:
      return RuleScorer(find_rule(arg), timeout_s)
    except ValueError as e:
      raise ValueError(f'--scorer={spec!r}: {e}') from None
  if kind == 'reward':
    if not arg:
      raise ValueError(f"--scorer={spec!r}: expected 'reward:WORKDIR' (a reward model's workdir)")
    return RewardModelScorer(arg)
  if kind == 'logprob' and not arg:
    if policy is None:
      raise ValueError("--scorer='logprob' needs the policy model")
    return LogprobScorer(policy)
  raise ValueError(f"--scorer={spec!r}: expected 'rule:NAME', 'reward:WORKDIR', "
                   "'judge:WORKDIR[:RUBRIC]' or 'logprob'")

"""The harness over a scripted model: scoring by kind, records, and code candidates that must
never hang the run."""
import math
import time

import numpy as np
import pytest

from train.evaluation import harness, task as task_lib
from train.evaluation.lm import Generation
from train.evaluation.prompting import Style


class Scripted:
  """An EvalModel whose answers come from functions of the request."""
  name = 'scripted'

  def __init__(self, ll=None, gen=None, rolling=None):
    self.ll, self.gen, self.rolling, self.calls = ll, gen, rolling, []

  def loglikelihood(self, pairs):
    self.calls.append(('ll', len(pairs)))
    return [(self.ll(c, k), False) for c, k in pairs]

  def loglikelihood_rolling(self, texts):
    self.calls.append(('rolling', len(texts)))
    return [self.rolling(t) for t in texts]

  def generate(self, prompts, gen: Generation):
    self.calls.append(('gen', len(prompts), gen))
    return [[self.gen(p, i) for i in range(gen.n)] for p in prompts]


def _mc_task():
  docs = [{'query': f'q{i}', 'choices': ['yes', 'no', 'a much longer choice'], 'gold': i % 3}
          for i in range(12)]
  return task_lib.Task('mc_fake', 'multiple_choice', lambda s: [dict(d) for d in docs])


def test_multiple_choice_acc_and_acc_norm_in_one_call():
  # Raw log-likelihood prefers the long choice; per character it is the worst.
  model = Scripted(ll=lambda ctx, cont: {' yes': -3.0, ' no': -2.5,
                                         ' a much longer choice': -2.0}[cont])
  r = harness.evaluate(model, [(_mc_task(), Style())])['tasks']['mc_fake']
  assert model.calls == [('ll', 36)]
  assert r['metrics']['acc']['mean'] == pytest.approx(4 / 12)       # gold == 2 for 4 items.
  assert r['metrics']['acc_norm']['mean'] == pytest.approx(4 / 12)  # -2.5/2 best: gold == 1.
  rec = r['records'][1]
  assert rec['pred'] == 2 and rec['loglikelihoods'] == [-3.0, -2.5, -2.0]
  assert rec['prompt'] == 'Q: q1\nA:'


def test_generation_extracts_answers_and_saves_the_prompt_sent():
  t = task_lib.get('arithmetic')
  answers = {f'Q: {e["query"]}\nA:': e['answer'] for e in t.split('test')[:10]}
  model = Scripted(gen=lambda p, i: (f' {answers[p]}' if p.endswith('0?\nA:') else ' 1'))
  r = harness.evaluate(model, [(t, Style())], limit=10)['tasks']['arithmetic']
  right = [p.endswith('0?\nA:') for p in answers]
  assert r['metrics']['exact_match']['mean'] == pytest.approx(np.mean(right))
  assert [rec['prompt'] for rec in r['records']] == list(answers)
  _, n, gen = model.calls[0]
  assert n == 10 and gen.until == ('\n',) and gen.max_tokens == t.max_tokens
  cot = harness.evaluate(model, [(t, Style(cot=True))], limit=2)['tasks']['arithmetic:cot']
  assert model.calls[-1][2].until == t.cot_until and cot['style'] == '0-shot CoT'


BODIES = {
    'right': '    return a + b\n',
    'wrong': '    return a - b\n',
    'loop': '    while True:\n        pass\n',
    'memory': '    x = []\n    while True:\n        x.append(bytearray(10**8))\n',
    'network': ('    import socket\n    try:\n        socket.create_connection(("127.0.0.1", 9))\n'
                '    except Exception:\n        pass\n    return a + b\n'),
    'spawn': '    import os\n    os.system("true")\n    return a + b\n',
}


def test_code_candidates_that_loop_allocate_or_reach_out_fail_without_hanging():
  prompt = 'def add(a, b):\n    """Sum."""\n'
  t = task_lib.Task('code_fake', 'code', lambda s: [
      {'query': prompt, 'test': 'assert add(2, 3) == 5\n', 'entry_point': 'add'}],
      samples=len(BODIES), ks=(1, 3), timeout_s=5.0)   # Room for a busy machine's start-up.
  kinds = list(BODIES)
  model = Scripted(gen=lambda p, i: BODIES[kinds[i]])
  t0 = time.perf_counter()
  r = harness.evaluate(model, [(t, Style())])['tasks']['code_fake']
  assert time.perf_counter() - t0 < 60
  rec = r['records'][0]
  status = dict(zip(kinds, (o['status'] for o in rec['outcomes'])))
  assert status == {'right': 'passed', 'wrong': 'failed', 'loop': 'timeout', 'memory': 'memory',
                    'network': 'blocked', 'spawn': 'blocked'}
  assert rec['passed'] == 1
  n = len(BODIES)
  assert r['metrics']['pass@1']['mean'] == pytest.approx(1 / n)
  assert r['metrics']['pass@3']['mean'] == pytest.approx(1 - math.comb(n - 1, 3) / math.comb(n, 3))
  assert model.calls[0][2].n == n


def test_perplexity_is_total_bits_over_total_bytes():
  texts = ['a' * 10, 'b' * 30]
  t = task_lib.Task('ppl_fake', 'perplexity', lambda s: [{'text': x} for x in texts])
  model = Scripted(rolling=lambda text: (-len(text) * 0.5, len(text) // 2))
  r = harness.evaluate(model, [(t, Style())])['tasks']['ppl_fake']['metrics']
  assert r['bits_per_byte']['mean'] == pytest.approx(0.5 / math.log(2))
  assert r['perplexity']['mean'] == pytest.approx(math.exp(1.0))
  assert r['bits_per_byte']['ci_low'] == pytest.approx(r['bits_per_byte']['ci_high'])


def test_flat_metrics_and_table():
  model = Scripted(ll=lambda c, k: -len(k))
  res = harness.evaluate(model, [(_mc_task(), Style())])
  assert set(harness.flat_metrics(res)) == {'eval/mc_fake/acc', 'eval/mc_fake/acc_norm'}
  table = harness.summary_table(res)
  assert '| mc_fake | 0-shot | acc |' in table


def test_a_task_without_examples_is_refused():
  t = task_lib.Task('empty_fake', 'generate', lambda s: [])
  with pytest.raises(ValueError, match="task 'empty_fake' has no test examples"):
    harness.evaluate(Scripted(), [(t, Style())])


def test_code_bodies_keep_their_indentation_and_are_parsed():
  t = task_lib.get('stdlib_functions')
  ex = t.split('test')[:2]
  bodies = {ex[0]['query']: ex[0]['answer'], ex[1]['query']: '    return (\n'}
  model = Scripted(gen=lambda p, i: bodies.get(p, ''))
  r = harness.evaluate(model, [(t, Style())], limit=2)['tasks']['stdlib_functions']
  assert [rec['parses'] for rec in r['records']] == [1.0, 0.0]
  assert r['records'][0]['code_exact'] == 1.0
  assert r['records'][0]['extracted'] == ex[0]['answer']
  assert model.calls[0][2].heal is False   # The prompt's tokens exactly as SFT encoded them.

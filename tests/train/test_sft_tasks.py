"""The bundled arithmetic task: right answers, deterministic, test questions never trained on,
and the evaluation task that asks them as SFT does."""
import re

import pytest

from train import sft_tasks


def test_arithmetic_answers_splits_and_determinism():
  splits = {s: sft_tasks.arithmetic(s) for s in sft_tasks.SPLITS}
  assert {s: len(r) for s, r in splits.items()} == sft_tasks.ARITHMETIC_SIZES
  for recs in splits.values():
    for r in recs[:500]:
      a, op, b = re.fullmatch(r'What is (\d\d) ([+-]) (\d\d)\?\n', r['prompt']).groups()
      want = int(a) + int(b) if op == '+' else int(a) - int(b)
      assert r['completion'] == r['answer'] == str(want) and want >= 0
  test = {r['prompt'] for r in splits['test']}
  assert len(test) == 200
  assert not test & {r['prompt'] for r in splits['train'] + splits['validation']}
  assert sft_tasks.arithmetic('train')[:50] == splits['train'][:50]
  with pytest.raises(ValueError, match='split must be one of'):
    sft_tasks.arithmetic('dev')


def test_arithmetic_sft_eval_task_asks_the_test_split():
  from train.evaluation import task as task_lib
  from train.evaluation.prompting import Style, build_prompt
  task = task_lib.get('arithmetic_sft')
  examples = task.examples('test')
  assert [e['query'] for e in examples] == [r['prompt'] for r in sft_tasks.arithmetic('test')]
  assert build_prompt(task, examples[0], task.examples('train'), Style()) == examples[0]['query']
  assert not task.heal   # Prompt tokens exactly as SFT encoded them.

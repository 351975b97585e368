"""The bundled tasks: deterministic, well-formed, and right about their own answers."""
import ast

import pytest

from train.evaluation import sandbox, task as task_lib


def test_arithmetic_answers_and_rationales_are_right():
  t = task_lib.get('arithmetic')
  test, train = t.split('test'), t.split('train')
  assert (len(test), len(train)) == (200, 64)
  assert test == task_lib.get('arithmetic').examples('test')     # Deterministic.
  for ex in test + train:
    expr = ex['query'].removeprefix('What is ').removesuffix('?')
    assert str(eval(expr)) == ex['answer']                          # noqa: S307 (our own text)
    assert ex['rationale'].endswith(f'The answer is {ex["answer"]}.')
    for step in ex['rationale'].split('. ')[0].split(' = ')[1:]:
      assert str(eval(step)) == ex['answer']                        # noqa: S307
  assert {e['query'].split()[3] for e in test} == {'+', '-', '*'}


def test_stdlib_multiple_choice_is_well_formed():
  t = task_lib.get('stdlib_mc')
  test, train = t.split('test'), t.split('train')
  assert len(test) == 200 and len(train) == 32
  assert not {e['id'] for e in test} & {e['id'] for e in train}
  assert test[0]['held_out'] and not test[-1]['held_out']           # Held-out files first.
  for ex in test:
    assert len(set(ex['choices'])) == 4
    assert ex['id'].endswith('.' + ex['choices'][ex['gold']])
  golds = [ex['gold'] for ex in test]
  assert max(golds.count(g) for g in range(4)) < 80                 # Not always one position.


def test_stdlib_docstring_references_are_the_real_first_lines():
  t = task_lib.get('stdlib_docstring')
  for ex in t.split('test')[:20]:
    tree = ast.parse(ex['query'] + 'x"""\n    pass\n')
    assert isinstance(tree.body[0], ast.FunctionDef)
    assert ex['answer'] and '\n' not in ex['answer']
    assert ex['shown'] == ex['answer'] + '"""'


@pytest.mark.slow
def test_stdlib_code_problems_are_solvable_and_discriminating():
  t = task_lib.get('stdlib_code')
  problems = t.split('test')
  assert len(problems) >= 30
  picked = problems[::10]
  programs = [f'{p["query"]}{p["canonical"]}\n\n{p["test"]}\n' for p in picked]
  programs += [f'{p["query"]}    return None\n\n{p["test"]}\n' for p in picked]
  outcomes = sandbox.run_many(programs, sandbox.Limits(timeout_s=10.0))
  assert [o.passed for o in outcomes] == [True] * len(picked) + [False] * len(picked)


def test_stdlib_perplexity_is_the_quickstart_validation_split():
  from configs.base import get_base
  from train import corpus
  _, val, _ = corpus.load_documents(get_base().data)
  docs = task_lib.get('stdlib_ppl').split('test')
  assert [d['text'] for d in docs] == [d.text for d in val]

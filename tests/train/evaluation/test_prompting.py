"""k-shot and chain-of-thought prompts, and task specs."""
import json

import pytest

from train.evaluation import prompting, task as task_lib
from train.evaluation.prompting import Style


def _arith():
  return task_lib.get('arithmetic')


def test_zero_shot_prompt_is_the_question():
  t = _arith()
  ex = t.split('test')[0]
  assert prompting.build_prompt(t, ex, [], Style()) == f'Q: {ex["query"]}\nA:'
  cot = prompting.build_prompt(t, ex, [], Style(cot=True))
  assert cot == f'Q: {ex["query"]}\nA: {prompting.COT_TRIGGER}'


def test_k_shot_examples_are_deterministic_distinct_and_from_the_train_split():
  t = _arith()
  test, train = t.split('test'), t.split('train')
  prompts = [prompting.build_prompt(t, ex, train, Style(shots=3)) for ex in test[:20]]
  assert prompts == [prompting.build_prompt(t, ex, train, Style(shots=3)) for ex in test[:20]]
  assert len(set(p.split('\n\n')[0] for p in prompts)) > 5       # A fresh draw per example.
  train_q = {e['query'] for e in train}
  for p, ex in zip(prompts, test):
    blocks = p.split('\n\n')
    assert len(blocks) == 4 and blocks[-1] == f'Q: {ex["query"]}\nA:'
    shots = [b.split('\n')[0][3:] for b in blocks[:3]]
    assert len(set(shots)) == 3 and set(shots) <= train_q
  other = prompting.build_prompt(t, test[0], train, Style(shots=3, seed=1))
  assert other != prompts[0]


def test_cot_shots_show_rationales_that_end_in_the_answer():
  t = _arith()
  train = t.split('train')
  p = prompting.build_prompt(t, t.split('test')[0], train, Style(shots=2, cot=True))
  blocks = p.split('\n\n')
  for b in blocks[:2]:
    q = b.split('\n')[0][3:]
    ex = next(e for e in train if e['query'] == q)
    assert b.endswith(f"A: {prompting.COT_TRIGGER} {ex['rationale']}")
    assert ex['rationale'].endswith(f'The answer is {ex["answer"]}.')
  assert blocks[-1].endswith(prompting.COT_TRIGGER)


def test_a_shot_never_shows_the_example_itself():
  t = task_lib.Task('tiny_pool', 'generate', lambda split: [
      {'id': str(i), 'query': f'q{i}', 'answer': f'a{i}'} for i in range(3)])
  pool = t.split('train')
  for ex in pool:
    p = prompting.build_prompt(t, ex, pool, Style(shots=2))
    assert p.count(f'q{ex["id"]}') == 1
  with pytest.raises(ValueError, match='3-shot needs 3 train examples'):
    prompting.build_prompt(t, pool[0], pool, Style(shots=3))


@pytest.mark.parametrize('spec,message', [
    ('nope', "unknown task 'nope'"), ('arithmetic:3shots', "unknown variant '3shots'"),
    ('', '--tasks is empty')])
def test_bad_specs_name_the_problem(spec, message):
  with pytest.raises(ValueError, match=message):
    task_lib.parse_specs(spec)


def test_specs_parse_into_variants():
  (t1, s1), (t2, s2) = task_lib.parse_specs('arithmetic,stdlib_mc:5shot')
  assert (t1.name, s1) == ('arithmetic', Style()) and (t2.name, s2.shots) == ('stdlib_mc', 5)
  with pytest.raises(ValueError, match='chain of thought needs a generation task'):
    mc = task_lib.get('stdlib_mc')
    prompting.build_prompt(mc, mc.split('test')[0], [], Style(cot=True))


def test_user_task_file_and_jsonl_examples(tmp_path):
  data = tmp_path / 'qa.jsonl'
  data.write_text(json.dumps({'query': 'Capital of France?', 'answer': 'Paris'}) + '\n\n')
  f = tmp_path / 'my_task.py'
  f.write_text('from train.evaluation.task import Task, register, jsonl_examples\n'
               f"register(Task('my_qa_file', 'generate', jsonl_examples({str(data)!r}), "
               "metrics=('f1',)))\n")
  task_lib.load_task_file(str(f))
  t = task_lib.get('my_qa_file')
  assert t.split('test') == [{'query': 'Capital of France?', 'answer': 'Paris',
                              'id': 'my_qa_file/test/0'}]
  assert t.split('train') == []
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"query": "x", "answer": "y"}\n{oops\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: not JSON'):
    task_lib.jsonl_examples(str(bad))('test')
  missing = task_lib.Task('m', 'multiple_choice', lambda s: [{'query': 'x', 'choices': ['a']}])
  with pytest.raises(ValueError, match=r"missing field\(s\) \['gold'\]"):
    missing.split('test')
  out_of_range = task_lib.Task('m2', 'multiple_choice',
                               lambda s: [{'query': 'x', 'choices': ['a'], 'gold': 1}])
  with pytest.raises(ValueError, match='gold=1 is not an index'):
    out_of_range.split('test')
  with pytest.raises(ValueError, match='kind must be one of'):
    task_lib.Task('k', 'essay', lambda s: [])
  with pytest.raises(FileNotFoundError, match='task file'):
    task_lib.load_task_file(str(tmp_path / 'none.py'))

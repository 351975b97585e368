"""Bundled supervised fine-tuning tasks, built deterministically from the local Python install.

  stdlib_functions   a stdlib function's signature + docstring -> its body
                     ({"prompt": "def f(x):\\n    \\"\\"\\"Doc.\\"\\"\\"\\n", "completion": body})
  arithmetic         {"prompt": "What is 347 + 58?\\n", "completion": "405"}: the evaluation
                     task's questions (3-digit +/- 2-digit, 2-digit x 1-digit), none of its
                     200 test questions; the verifiable task RL trains on (configs/grpo.py)

Splits are disjoint by source file (a file's split comes from a hash of its path: ~80% train,
10% validation, 10% test), so no function's module-mates leak into its split. The evaluation
task of the same name (`train/evaluation/bundled_tasks.py`) generates bodies for the test split
and reports exact match and the fraction that parse.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from typing import Iterator

SPLITS = ('train', 'validation', 'test')
SKIP = ('test/', 'idlelib/', 'tkinter/', 'turtledemo/', 'lib2to3/', 'distutils/', 'ensurepip/',
        'pydoc_data')


def file_split(name: str) -> str:
  h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big') / 2.0**64
  return 'test' if h < 0.1 else 'validation' if h < 0.2 else 'train'


def documented_functions(docs) -> Iterator[dict]:
  """Module-level, undecorated, non-dunder functions with a docstring and a body after it, of
  stdlib `docs` (train/corpus.py Documents) in file order: {'file', 'module', 'name', 'lineno',
  'doc', 'header' (up to the docstring), 'prompt' (through the docstring), 'body' (the rest)}."""
  for d in docs:
    if not d.name.endswith('.py') or d.name.startswith(SKIP):
      continue
    try:
      tree = ast.parse(d.text)
    except SyntaxError:
      continue
    lines = d.text.splitlines(keepends=True)
    for node in tree.body:
      doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
      if (not doc or node.decorator_list or node.name.startswith('__')
          or len(node.body) < 2):
        continue
      end_of_doc = node.body[0].end_lineno
      yield {'file': d.name, 'module': d.name[:-3].replace('/', '.').removesuffix('.__init__'),
             'name': node.name, 'lineno': node.lineno, 'doc': doc,
             'header': ''.join(lines[node.lineno - 1:node.body[0].lineno - 1]),
             'prompt': ''.join(lines[node.lineno - 1:end_of_doc]),
             'body': ''.join(lines[end_of_doc:node.end_lineno])}


@functools.cache
def _functions(max_chars: int) -> tuple[tuple[str, dict], ...]:
  from train import corpus
  return tuple((file_split(f['file']), {'prompt': f['prompt'], 'completion': f['body'],
                                        'source': f'{f["file"]}:{f["lineno"]}'})
               for f in documented_functions(corpus.stdlib_documents())
               if len(f['prompt']) + len(f['body']) <= max_chars and f['body'].strip())


def stdlib_functions(split: str, max_chars: int = 800) -> list[dict]:
  """The split's records, in file order (functions of at most `max_chars` characters)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  return [dict(rec) for s, rec in _functions(max_chars) if s == split]


ARITHMETIC_SIZES = {'train': 20000, 'validation': 256, 'test': 200}


def arithmetic(split: str) -> list[dict]:
  """The split's records (module docstring), each with its "answer" (RL's reference). Train
  and validation are drawn from their own seeds and never ask a test question; the test split
  is the evaluation task's (`arithmetic_sft`, train/evaluation/bundled_tasks.py)."""
  from train.evaluation import bundled_tasks
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  test = bundled_tasks.arithmetic_examples('test')
  if split == 'test':
    examples = test
  else:
    held_out, examples = {e['query'] for e in test}, []
    rng = bundled_tasks._rng('arithmetic_sft', split)   # pylint: disable=protected-access
    while len(examples) < ARITHMETIC_SIZES[split]:
      e = bundled_tasks.arith_example(rng)
      if e['query'] not in held_out:
        examples.append(e)
  return [{'prompt': e['query'] + '\n', 'completion': e['answer'], 'answer': e['answer']}
          for e in examples]


SFT_TASKS = {'stdlib_functions': stdlib_functions, 'arithmetic': arithmetic}

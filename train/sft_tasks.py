"""Bundled supervised fine-tuning tasks, built deterministically from the local Python install.

  stdlib_functions   a stdlib function's signature + docstring -> its body
                     ({"prompt": "def f(x):\\n    \\"\\"\\"Doc.\\"\\"\\"\\n", "completion": body})
  arithmetic         {"prompt": "What is 47 + 38?\\n", "completion": "85"}: two-digit addition
                     and subtraction; 200 distinct test questions that train and validation
                     never ask; the verifiable task RL trains on (configs/grpo.py)

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


def _arith_question(rng) -> tuple[str, str]:
  """('What is 47 + 38?', '85'): two-digit operands, + or - (the larger first)."""
  a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
  if rng.integers(2):
    return f'What is {a} + {b}?', str(a + b)
  a, b = max(a, b), min(a, b)
  return f'What is {a} - {b}?', str(a - b)


@functools.cache
def _arithmetic() -> dict[str, tuple[tuple[str, str], ...]]:
  """Test questions first (distinct), then validation and train, never asking a test question."""
  import numpy as np
  rng = np.random.default_rng(20261130)
  test: dict[str, str] = {}
  while len(test) < ARITHMETIC_SIZES['test']:
    q, a = _arith_question(rng)
    test.setdefault(q, a)
  out = {'test': tuple(test.items())}
  for split in ('validation', 'train'):
    qs = []
    while len(qs) < ARITHMETIC_SIZES[split]:
      q, a = _arith_question(rng)
      if q not in test:
        qs.append((q, a))
    out[split] = tuple(qs)
  return out


def arithmetic(split: str) -> list[dict]:
  """The split's records (module docstring), each with its "answer" (RL's reference)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  return [{'prompt': q + '\n', 'completion': a, 'answer': a} for q, a in _arithmetic()[split]]


SFT_TASKS = {'stdlib_functions': stdlib_functions, 'arithmetic': arithmetic}

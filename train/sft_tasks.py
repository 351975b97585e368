"""Bundled supervised fine-tuning tasks, built deterministically from the local Python install.

  stdlib_functions   a stdlib function's signature + docstring -> its body
                     ({"prompt": "def f(x):\\n    \\"\\"\\"Doc.\\"\\"\\"\\n", "completion": body})

Splits are disjoint by source file (a file's split comes from a hash of its path: ~80% train,
10% validation, 10% test), so no function's module-mates leak into its split. The evaluation
task of the same name (`train/evaluation/bundled_tasks.py`) generates bodies for the test split
and reports exact match and the fraction that parse.
"""
from __future__ import annotations

import ast
import functools
import hashlib

SPLITS = ('train', 'validation', 'test')
_SKIP = ('test/', 'idlelib/', 'tkinter/', 'turtledemo/', 'lib2to3/', 'distutils/', 'ensurepip/')


def file_split(name: str) -> str:
  h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big') / 2.0**64
  return 'test' if h < 0.1 else 'validation' if h < 0.2 else 'train'


@functools.cache
def _functions(max_chars: int) -> tuple[tuple[str, dict], ...]:
  from train import corpus
  out = []
  for d in corpus.stdlib_documents():
    if not d.name.endswith('.py') or d.name.startswith(_SKIP):
      continue
    try:
      tree = ast.parse(d.text)
    except SyntaxError:
      continue
    lines = d.text.splitlines(keepends=True)
    for node in tree.body:
      if (not isinstance(node, ast.FunctionDef) or node.decorator_list or len(node.body) < 2
          or not ast.get_docstring(node)):
        continue
      prompt = ''.join(lines[node.lineno - 1:node.body[0].end_lineno])
      body = ''.join(lines[node.body[0].end_lineno:node.end_lineno])
      if len(prompt) + len(body) <= max_chars and body.strip():
        out.append((file_split(d.name), {'prompt': prompt, 'completion': body,
                                         'source': f'{d.name}:{node.lineno}'}))
  return tuple(out)


def stdlib_functions(split: str, max_chars: int = 800) -> list[dict]:
  """The split's records, in file order (functions of at most `max_chars` characters)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  return [dict(rec) for s, rec in _functions(max_chars) if s == split]


SFT_TASKS = {'stdlib_functions': stdlib_functions}

"""Bundled preference tasks, built deterministically from the local Python install.

  stdlib_preferences   a stdlib function's signature + docstring -> chosen: its real body;
                       rejected: the body broken so the function no longer parses (cut
                       mid-statement, or a line's indentation lost), up to three distinct
                       breaks per function, one pair each; a function with no such break
                       gets the body of another function of the same split (a well-formed
                       answer to a different question).

Splits are the SFT task's (train/sft_tasks.py: disjoint by source file), so a preference model
tuned on `train` is judged on functions from files it never saw. The task's own metric is the
evaluation task `stdlib_functions` (train/evaluation/bundled_tasks.py): the fraction of
generated bodies that parse, and exact match.
"""
from __future__ import annotations

import ast
import functools
import hashlib

from train import sft_tasks


VARIANTS = 3   # Broken versions per function (distinct ones; fewer when cuts coincide).


def parses(prompt: str, body: str) -> bool:
  """Whether prompt + body is valid Python (the function compiles to an AST)."""
  try:
    ast.parse(prompt + body)
    return True
  except (SyntaxError, ValueError):
    return False


def _seed(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'big')


def corrupt(prompt: str, body: str, seed: int) -> str | None:
  """A version of `body` that makes prompt + body fail to parse, or None if none is found."""
  lines = body.splitlines(keepends=True)
  candidates = []
  # Cut mid-statement: keep from 30% to 80% of the characters, ending inside a line.
  n = len(body)
  for k in range(8):
    at = int(n * (0.3 + 0.5 * ((seed >> (4 * k)) % 16) / 15))
    cut = body[:at].rstrip()
    if cut and not cut.endswith(':'):
      candidates.append(cut + '\n')
  # Lose one line's indentation (an IndentationError, or code escaping the function).
  for k in range(len(lines)):
    i = (seed + k) % len(lines)
    if lines[i].strip() and lines[i] != lines[i].lstrip():
      candidates.append(''.join(lines[:i] + [lines[i].lstrip()] + lines[i + 1:]))
  start = seed % max(len(candidates), 1)
  for c in candidates[start:] + candidates[:start]:
    if c.strip() and c != body and not parses(prompt, c):
      return c
  return None


@functools.cache
def _pairs(split: str) -> tuple[dict, ...]:
  records = sft_tasks.stdlib_functions(split)
  out = []
  for i, r in enumerate(records):
    prompt, body = r['prompt'], r['completion']
    seed = _seed(r['source'])
    rejected = []
    for k in range(VARIANTS):   # Several broken versions: more pairs per function.
      bad = corrupt(prompt, body, seed + 7919 * k)
      if bad is not None and bad not in rejected:
        rejected.append(bad)
    if not rejected and len(records) > 1:   # Another function's body (well formed).
      other = records[(i + 1 + seed % (len(records) - 1)) % len(records)]['completion']
      rejected = [other] if other != body else []
    out += [{'prompt': prompt, 'chosen': body, 'rejected': bad, 'source': r['source']}
            for bad in rejected]
  return tuple(out)


def stdlib_preferences(split: str) -> list[dict]:
  """The split's pairs {'prompt', 'chosen', 'rejected', 'source'} in file order."""
  return [dict(p) for p in _pairs(split)]


PREFERENCE_TASKS = {'stdlib_preferences': stdlib_preferences}

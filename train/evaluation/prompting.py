"""Prompts for evaluation: zero-shot, k-shot and chain-of-thought variants of a task.

k-shot examples come from the task's 'train' split, drawn without replacement by a generator
seeded from (task, example id, seed): the same prompt every run, a different draw per example
(Brown et al. 2020 draw a fresh set per example). Chain of thought (Wei et al. 2022) shows worked
rationales in the examples; zero-shot it appends "Let's think step by step." (Kojima et al.
2022). The prompt actually sent is returned and saved with every record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Sequence

import numpy as np

COT_TRIGGER = "Let's think step by step."


@dataclasses.dataclass(frozen=True)
class Style:
  """How to prompt: `shots` worked examples before the question, `cot` chain of thought."""
  shots: int = 0
  cot: bool = False
  seed: int = 0

  @property
  def label(self) -> str:
    return f'{self.shots}-shot' + (' CoT' if self.cot else '')

  @classmethod
  def parse(cls, parts: Sequence[str], spec: str = '') -> 'Style':
    """['3shot', 'cot'] -> Style(3, True); names the spec on anything else."""
    shots, cot = 0, False
    for p in parts:
      m = re.fullmatch(r'(\d+)shot', p)
      if m:
        shots = int(m.group(1))
      elif p == 'cot':
        cot = True
      else:
        raise ValueError(f'task spec {spec!r}: unknown variant {p!r} (expected e.g. '
                         "'arithmetic:3shot', 'arithmetic:cot' or 'arithmetic:3shot:cot')")
    return cls(shots, cot)


def draw_shots(task, example: dict, pool: Sequence[dict], style: Style) -> list[dict]:
  """`style.shots` examples of `pool` (the train split), never `example` itself."""
  if not style.shots:
    return []
  candidates = [e for e in pool if e['id'] != example['id']]
  if len(candidates) < style.shots:
    raise ValueError(f'task {task.name!r}: {style.shots}-shot needs {style.shots} train examples, '
                     f'the train split has {len(candidates)}')
  digest = hashlib.sha256(f'{task.name}\0{example["id"]}\0{style.seed}'.encode()).digest()
  rng = np.random.default_rng(int.from_bytes(digest[:8], 'little'))
  return [candidates[i] for i in rng.choice(len(candidates), style.shots, replace=False)]


def _shown_answer(task, ex: dict, style: Style) -> str:
  if task.kind == 'multiple_choice':
    return ex['choices'][ex['gold']]
  if style.cot:
    if 'rationale' not in ex:
      raise ValueError(f'task {task.name!r}: chain-of-thought examples need a `rationale` field')
    return f'{COT_TRIGGER} {ex["rationale"]}'
  return ex.get('shown', ex['answer'])


def build_prompt(task, example: dict, pool: Sequence[dict], style: Style) -> str:
  """The text sent for `example`: description, worked shots, then the open question (ending in
  the answer prefix, plus the CoT trigger when chain of thought is on)."""
  if task.kind in ('code', 'perplexity'):
    if style.shots or style.cot:
      raise ValueError(f'task {task.name!r} ({task.kind}) has no k-shot or chain-of-thought '
                       'variant')
    return example['query'] if task.kind == 'code' else example['text']
  if style.cot and task.kind == 'multiple_choice':
    raise ValueError(f'task {task.name!r}: chain of thought needs a generation task; '
                     'multiple choice is scored by log-likelihood')
  parts = [task.description] if task.description else []
  for shot in draw_shots(task, example, pool, style):
    parts.append(f'{task.query_prefix}{shot["query"]}{task.answer_prefix}'
                 f'{task.answer_separator}{_shown_answer(task, shot, style)}')
  question = f'{task.query_prefix}{example["query"]}{task.answer_prefix}'
  if style.cot and task.kind == 'generate':
    question += f' {COT_TRIGGER}'
  parts.append(question)
  return task.example_separator.join(parts)

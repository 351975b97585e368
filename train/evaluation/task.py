"""Evaluation tasks: what an example looks like, how it is scored, and the registry of tasks.

A task is a name, a kind and a function from a split ('test' for scoring, 'train' for k-shot
examples) to examples: plain dicts with the fields of the kind.

  kind               example fields                                   metrics
  multiple_choice    query, choices [str], gold (index)               acc, acc_norm
  generate           query, answer, [references], [rationale]         exact_match, f1, rouge_l
  code               query (signature + docstring), test, entry_point pass@k
  perplexity         text                                             bits_per_byte, perplexity

Every example also has a stable `id`. Adding a task is a small file:

    from train.evaluation.task import Task, register, jsonl_examples
    register(Task('my_qa', 'generate', jsonl_examples('data/my_qa.jsonl'), metrics=('f1',)))

and `launch.eval --task_files=that_file.py --tasks=my_qa`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
  from train.evaluation.prompting import Style

KINDS = ('multiple_choice', 'generate', 'code', 'perplexity')
SPLITS = ('test', 'train')
_REQUIRED = {'multiple_choice': ('query', 'choices', 'gold'), 'generate': ('query', 'answer'),
             'code': ('query', 'test', 'entry_point'), 'perplexity': ('text',)}


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task (see the module docstring for `kind` and example fields).

  `examples(split)` returns the split's examples in a fixed order. Prompting: `description` opens
  every prompt; an example reads `query_prefix + query + answer_prefix` and, shown as a k-shot
  example, continues with `answer_separator` + answer (or the example's `shown` text; chain of
  thought: the rationale); multiple-choice continuations are `answer_separator` + choice.
  Generation stops at `until` (chain of thought at `cot_until`) after at most `max_tokens`;
  `answer_patterns` pull the answer out of a response (metrics.extract_answer; empty = the whole
  response). Code tasks draw
  `samples` candidates at `temperature` and report pass@k for each k in `ks`."""
  name: str
  kind: str
  examples: Callable[[str], list[dict]]
  metrics: tuple[str, ...] = ()
  description: str = ''
  query_prefix: str = 'Q: '
  answer_prefix: str = '\nA:'
  answer_separator: str = ' '
  example_separator: str = '\n\n'
  until: tuple[str, ...] = ('\n',)
  cot_until: tuple[str, ...] = ('\n\n', '\nQ:')
  max_tokens: int = 32
  cot_max_tokens: int = 96
  answer_patterns: tuple[str, ...] = ()
  strip_response: bool = True    # False for code, whose leading indentation is syntax.
  heal: bool = True              # False: prompt tokens exactly as SFT encoded them.
  samples: int = 1
  temperature: float = 0.0
  ks: tuple[int, ...] = (1,)
  timeout_s: float = 5.0
  notes: str = ''

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}')
    defaults = {'multiple_choice': ('acc', 'acc_norm'), 'generate': ('exact_match',),
                'code': (), 'perplexity': ('bits_per_byte', 'perplexity')}
    if not self.metrics:
      object.__setattr__(self, 'metrics', defaults[self.kind])
    if self.kind == 'code' and (max(self.ks) > self.samples or min(self.ks) < 1):
      raise ValueError(f'task {self.name!r}: every k in ks={self.ks} must be in [1, samples='
                       f'{self.samples}]')

  def split(self, split: str) -> list[dict]:
    """The checked examples of `split` ('test' or 'train')."""
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    out = self.examples(split)
    for i, ex in enumerate(out):
      missing = [f for f in _REQUIRED[self.kind] if f not in ex]
      if missing:
        raise ValueError(f'task {self.name!r} {split} example {i}: missing field(s) {missing} '
                         f'(a {self.kind} example needs {list(_REQUIRED[self.kind])})')
      if self.kind == 'multiple_choice' and not 0 <= ex['gold'] < len(ex['choices']):
        raise ValueError(f'task {self.name!r} {split} example {i}: gold={ex["gold"]} is not an '
                         f'index into its {len(ex["choices"])} choices')
      ex.setdefault('id', f'{self.name}/{split}/{i}')
    return out


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
  if task.name in TASKS and TASKS[task.name] is not task:
    raise ValueError(f'task {task.name!r} is registered twice')
  TASKS[task.name] = task
  return task


def get(name: str) -> Task:
  _load_bundled()
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; known: {", ".join(sorted(TASKS))} (or add one '
                     'with --task_files)')
  return TASKS[name]


def load_task_file(path: str) -> None:
  """Runs a user's task file (it calls `register`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'task file {path} not found')
  spec = importlib.util.spec_from_file_location(f'palmax_task_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)


@functools.cache
def _load_bundled() -> None:
  from train.evaluation import bundled_tasks  # noqa: F401  (registers on import)


def jsonl_examples(test_path: str, train_path: str | None = None) -> Callable[[str], list[dict]]:
  """Examples from JSONL files, one object per line ('train' from `train_path`, else none)."""
  def examples(split: str) -> list[dict]:
    from train import paths
    path = test_path if split == 'test' else train_path
    return [] if path is None else [obj for obj, _ in paths.read_jsonl(path, 'task file')]
  return examples


def parse_specs(specs: str | Sequence[str]) -> list[tuple[Task, Style]]:
  """'arithmetic,arithmetic:3shot:cot' -> [(task, Style)]: the variants of a run."""
  from train.evaluation.prompting import Style
  if isinstance(specs, str):
    specs = [s for s in specs.split(',') if s.strip()]
  if not specs:
    raise ValueError('--tasks is empty: name at least one task (e.g. --tasks=arithmetic)')
  out = []
  for spec in specs:
    name, *variant = spec.strip().split(':')
    out.append((get(name), Style.parse(variant, spec)))
  return out

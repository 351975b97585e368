"""Tasks that need no download, built deterministically from what every Python install has.

  arithmetic        generate         "What is 37 + 48?" (2-3 digit +, -, and 2-digit x 1-digit);
                                     worked rationales for chain of thought
  stdlib_mc         multiple_choice  which of four stdlib functions a docstring belongs to
  stdlib_docstring  generate         a stdlib function's one-line docstring from its signature
                                     (ROUGE-L, F1, exact match)
  stdlib_code       code             a stdlib function's body from its signature and docstring,
                                     checked by the docstring's own doctests (pass@k)
  stdlib_ppl        perplexity       bits per byte over the stdlib files the quickstart holds out
  arithmetic_sft    generate         the arithmetic SFT task's test split ("What is 37 + 48?\\n" ->
                                     "85", two-digit +/-): what an SFT or RL run on it measures
  stdlib_functions  generate         the SFT task's test split (train/sft_tasks.py): a body from
                                     signature + docstring (parses, exact code, ROUGE-L)

The stdlib tasks read the running Python's standard library, the quickstart's training corpus:
every stdlib example records `held_out` (its file is in the quickstart's validation split), so a
score can be split into seen and unseen files.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from train.evaluation.task import Task, register


def _rng(*key) -> np.random.Generator:
  digest = hashlib.sha256('\0'.join(map(str, key)).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], 'little'))


# ---- arithmetic ------------------------------------------------------------------------------

def _arith_example(rng: np.random.Generator) -> dict:
  op = rng.choice(['+', '-', '*'])
  if op == '*':
    a, b = int(rng.integers(12, 100)), int(rng.integers(2, 10))
    tens, ones = a - a % 10, a % 10
    c = a * b
    why = f'{a} * {b} = {tens} * {b} + {ones} * {b} = {tens * b} + {ones * b} = {c}.'
  else:
    a, b = int(rng.integers(10, 1000)), int(rng.integers(10, 100))
    tens, ones = b - b % 10, b % 10
    c = a + b if op == '+' else a - b
    mid = a + tens if op == '+' else a - tens
    why = f'{a} {op} {b} = {a} {op} {tens} {op} {ones} = {mid} {op} {ones} = {c}.'
  return {'query': f'What is {a} {op} {b}?', 'answer': str(c),
          'rationale': f'{why} The answer is {c}.'}


def arithmetic_examples(split: str) -> list[dict]:
  rng = _rng('arithmetic', split)
  n = 200 if split == 'test' else 64
  return [dict(_arith_example(rng), id=f'arithmetic/{split}/{i}') for i in range(n)]


register(Task('arithmetic', 'generate', arithmetic_examples, metrics=('exact_match',),
              answer_patterns=(r'[Tt]he answer is\s*(-?\d[\d,]*)', 'last_number'),
              max_tokens=8, cot_max_tokens=64,
              notes='exact match of the extracted number'))


def arithmetic_sft_examples(split: str) -> list[dict]:
  """The arithmetic SFT task's 200 test questions (train/sft_tasks.py), asked as it asks them;
  its validation split is the pool for k-shot examples."""
  from train import sft_tasks
  recs = sft_tasks.arithmetic('validation' if split == 'train' else 'test')
  return [{'id': f'arithmetic_sft/{split}/{i}', 'query': r['prompt'], 'answer': r['answer']}
          for i, r in enumerate(recs)]


register(Task('arithmetic_sft', 'generate', arithmetic_sft_examples, metrics=('exact_match',),
              query_prefix='', answer_prefix='', answer_separator='', example_separator='\n',
              max_tokens=8, heal=False, notes='the SFT format: question line, then the number'))


# ---- the standard library ------------------------------------------------------------------

@functools.cache
def _documented_functions() -> tuple[dict, ...]:
  """Documented stdlib functions (train/sft_tasks.py), the quickstart's held-out files first."""
  from configs.base import get_base
  from train import corpus
  from train.sft_tasks import documented_functions
  train_docs, val_docs, _ = corpus.load_documents(get_base().data)
  return tuple(dict(f, held_out=held_out) for held_out, docs in ((True, val_docs),
                                                                 (False, train_docs))
               for f in documented_functions(docs))


def _summary(doc: str) -> str:
  return doc.strip().split('\n\n')[0].replace('\n', ' ')


def _split_of(fns, split: str, n_test: int, n_train: int) -> list[dict]:
  """Held-out files first, then a deterministic shuffle of the rest; test and train disjoint."""
  held = [f for f in fns if f['held_out']]
  rest = [f for f in fns if not f['held_out']]
  order = _rng('stdlib-order').permutation(len(rest))
  pool = held + [rest[i] for i in order]
  return pool[:n_test] if split == 'test' else pool[n_test:n_test + n_train]


def stdlib_mc_examples(split: str) -> list[dict]:
  fns = [f for f in _documented_functions() if 20 <= len(_summary(f['doc'])) <= 200]
  names = sorted({f['name'] for f in fns})
  out = []
  for f in _split_of(fns, split, 200, 32):
    rng = _rng('stdlib_mc', f['file'], f['name'])
    same_file = sorted({g['name'] for g in fns if g['file'] == f['file']} - {f['name']})
    pool = same_file if len(same_file) >= 3 else sorted(set(names) - {f['name']})
    choices = [pool[i] for i in rng.choice(len(pool), 3, replace=False)] + [f['name']]
    choices = [choices[i] for i in rng.permutation(4)]
    out.append({'id': f'stdlib_mc/{f["module"]}.{f["name"]}',
                'query': f'Which function of {f["module"]} does this docstring document?\n'
                         f'"""{_summary(f["doc"])}"""',
                'choices': choices, 'gold': choices.index(f['name']), 'held_out': f['held_out']})
  return out


register(Task('stdlib_mc', 'multiple_choice', stdlib_mc_examples,
              notes='4 choices: the right name and 3 other functions of the same module'))


def stdlib_docstring_examples(split: str) -> list[dict]:
  fns = [f for f in _documented_functions()
         if 10 <= len(f['doc'].strip().splitlines()[0]) <= 120 and len(f['header']) <= 200]
  out = []
  for f in _split_of(fns, split, 200, 32):
    first = f['doc'].strip().splitlines()[0].strip()
    out.append({'id': f'stdlib_docstring/{f["module"]}.{f["name"]}',
                'query': f['header'] + '    """', 'answer': first,
                'shown': first + '"""', 'held_out': f['held_out']})
  return out


register(Task('stdlib_docstring', 'generate', stdlib_docstring_examples,
              metrics=('rouge_l', 'f1', 'exact_match'), query_prefix='', answer_prefix='',
              answer_separator='', example_separator='\n\n', until=('"""', '\n'),
              max_tokens=32, notes="against the function's own first docstring line"))


_CHECK = '''
import doctest as _doctest, importlib as _importlib, sys as _sys, types as _types
_mod = _importlib.import_module({module!r})
_cand = {name}
# Rebind the candidate to the module's globals: its body may use the module's helpers.
_fn = _types.FunctionType(_cand.__code__, vars(_mod), _cand.__name__, _cand.__defaults__,
                          _cand.__closure__)
_fn.__kwdefaults__ = _cand.__kwdefaults__
_globs = dict(vars(_mod), **{{{name!r}: _fn}})
_test = _doctest.DocTestParser().get_doctest({doc!r}, _globs, {name!r}, None, 0)
_runner = _doctest.DocTestRunner(optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)
_runner.run(_test, out=_sys.stderr.write)
_sys.exit(1 if _runner.failures or not _test.examples else 0)
'''


@functools.cache
def _code_problems() -> tuple[dict, ...]:
  """Doctested functions whose own body passes its doctests in the sandbox and an empty body
  fails them (the rest either cannot be solved here, needing files, the network or state, or
  pass anything: skipped or random-output examples)."""
  from train.evaluation import sandbox
  cands = [f for f in _documented_functions() if '>>>' in f['doc'] and len(f['prompt']) <= 700
           and len(f['body']) <= 600]
  tests = [_CHECK.format(module=f['module'], name=f['name'], doc=f['doc']) for f in cands]
  limits = sandbox.Limits(timeout_s=10.0)
  own = sandbox.run_many([f['prompt'] + f['body'] + '\n' + t for f, t in zip(cands, tests)],
                         limits)
  empty = sandbox.run_many([f['prompt'] + '    pass\n\n' + t for f, t in zip(cands, tests)],
                           limits)
  return tuple(dict(f, test=t) for f, t, a, b in zip(cands, tests, own, empty)
               if a.passed and not b.passed)


def stdlib_code_examples(split: str) -> list[dict]:
  if split == 'train':
    return []
  return [{'id': f'stdlib_code/{f["module"]}.{f["name"]}', 'query': f['prompt'],
           'test': f['test'], 'entry_point': f['name'], 'canonical': f['body'],
           'held_out': f['held_out']} for f in _code_problems()]


register(Task('stdlib_code', 'code', stdlib_code_examples, samples=10, temperature=0.8,
              ks=(1, 5, 10), max_tokens=128, timeout_s=10.0,
              notes="pass@k against the function's own doctests, run in the sandbox"))


def stdlib_ppl_examples(split: str) -> list[dict]:
  from configs.base import get_base
  from train import corpus
  if split == 'train':
    return []
  _, val_docs, _ = corpus.load_documents(get_base().data)
  return [{'id': f'stdlib_ppl/{d.name}', 'text': d.text} for d in val_docs]


register(Task('stdlib_ppl', 'perplexity', stdlib_ppl_examples,
              notes="the quickstart's validation files, scored whole (rolling windows)"))


def stdlib_functions_examples(split: str) -> list[dict]:
  """The SFT task's test split (train/sft_tasks.py: disjoint from its training files)."""
  from train import sft_tasks
  if split == 'train':
    return []
  return [{'id': f'stdlib_functions/{r["source"]}', 'query': r['prompt'],
           'answer': r['completion']} for r in sft_tasks.stdlib_functions('test')]


register(Task('stdlib_functions', 'generate', stdlib_functions_examples,
              metrics=('parses', 'code_exact', 'rouge_l'), query_prefix='', answer_prefix='',
              answer_separator='', until=('\ndef ', '\nclass ', '\n@', '\nif __name__'),
              max_tokens=128, strip_response=False, heal=False,
              notes='the SFT task: a body from signature + docstring'))

"""Runs evaluation tasks against an EvalModel: per-example records and summary metrics with
bootstrap intervals.

    results = evaluate(model, parse_specs('arithmetic,arithmetic:3shot:cot'), limit=200)
    results['tasks']['arithmetic:3shot:cot']['metrics']['exact_match']
        # -> {'mean': .., 'ci_low': .., 'ci_high': .., 'n': 200}

Every request of a task variant goes to the model in one call (the engine batches generations;
log-likelihoods are scored in padded batches).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from train.evaluation import metrics as M
from train.evaluation import prompting
from train.evaluation.lm import EvalModel, Generation
from train.evaluation.task import Task

CODE_UNTIL = ('\ndef ', '\nclass ', '\nif __name__', '\nprint(', '\n#')


def evaluate(model: EvalModel, specs: Sequence[tuple[Task, prompting.Style]], *,
             limit: int | None = None, log: Callable[[str], None] = lambda *_: None) -> dict:
  """{'model', 'tasks': {spec: {'task', 'kind', 'style', 'metrics', 'records', 'seconds'}}}."""
  out = {'model': getattr(model, 'name', type(model).__name__), 'tasks': {}}
  for task, style in specs:
    spec = spec_name(task, style)
    t0 = time.perf_counter()
    examples = task.split('test')[:limit] if limit else task.split('test')
    if not examples:
      raise ValueError(f'task {task.name!r} has no test examples')
    pool = task.split('train') if style.shots else []
    prompts = [prompting.build_prompt(task, ex, pool, style) for ex in examples]
    records, summary = KIND_RUNNERS[task.kind](model, task, style, examples, prompts)
    secs = time.perf_counter() - t0
    out['tasks'][spec] = {'task': task.name, 'kind': task.kind, 'style': style.label,
                          'metrics': summary, 'records': records, 'seconds': round(secs, 2)}
    log(f'{spec}: ' + '  '.join(f'{k} {v["mean"]:.4f} [{v["ci_low"]:.4f}, {v["ci_high"]:.4f}]'
                                for k, v in summary.items()) + f'  ({len(records)} examples, '
        f'{secs:.1f}s)')
  return out


def spec_name(task: Task, style: prompting.Style) -> str:
  """'arithmetic:3shot:cot': the spec `task.parse_specs` reads back."""
  variant = ([f'{style.shots}shot'] if style.shots else []) + (['cot'] if style.cot else [])
  return ':'.join([task.name] + variant)


def _multiple_choice(model, task, style, examples, prompts):
  pairs = [(p, task.answer_separator + c)
           for p, ex in zip(prompts, examples) for c in ex['choices']]
  scores = iter(model.loglikelihood(pairs))
  records, values = [], {m: [] for m in task.metrics}
  for p, ex in zip(prompts, examples):
    lls = np.array([next(scores)[0] for _ in ex['choices']])
    # acc_norm divides by the choice's length in characters, as lm-evaluation-harness does.
    norm = lls / np.array([max(1, len(c)) for c in ex['choices']])
    got = {'acc': float(np.argmax(lls) == ex['gold']),
           'acc_norm': float(np.argmax(norm) == ex['gold'])}
    for m in task.metrics:
      values[m].append(got[m])
    records.append({'id': ex['id'], 'prompt': p, 'choices': ex['choices'], 'gold': ex['gold'],
                    'loglikelihoods': lls.tolist(), 'pred': int(np.argmax(lls)), **got})
  return records, {m: M.summarize(v) for m, v in values.items()}


def _generate(model, task, style, examples, prompts):
  gen = Generation(max_tokens=task.cot_max_tokens if style.cot else task.max_tokens,
                   until=task.cot_until if style.cot else task.until, heal=task.heal)
  responses = model.generate(prompts, gen)
  records, values = [], {m: [] for m in task.metrics}
  for p, ex, (resp,) in zip(prompts, examples, responses):
    answer = (M.extract_answer(resp, task.answer_patterns) if task.answer_patterns
              else resp.strip() if task.strip_response else resp)
    refs = ex.get('references') or [ex['answer']]
    got = {m: M.GENERATION_METRICS[m](answer, refs) for m in task.metrics}
    for m, v in got.items():
      values[m].append(v)
    records.append({'id': ex['id'], 'prompt': p, 'response': resp, 'extracted': answer,
                    'references': refs, **got})
  return records, {m: M.summarize(v) for m, v in values.items()}


def _code(model, task, style, examples, prompts):
  from train.evaluation import sandbox
  gen = Generation(max_tokens=task.max_tokens, until=CODE_UNTIL, temperature=task.temperature,
                   n=task.samples)
  responses = model.generate(prompts, gen)
  programs = [f'{p}{c}\n\n{ex["test"]}\n' for p, ex, cands in zip(prompts, examples, responses)
              for c in cands]
  outcomes = iter(sandbox.run_many(programs, sandbox.Limits(timeout_s=task.timeout_s)))
  records, values = [], {f'pass@{k}': [] for k in task.ks}
  for p, ex, cands in zip(prompts, examples, responses):
    runs = [next(outcomes) for _ in cands]
    c = sum(r.passed for r in runs)
    got = {f'pass@{k}': M.pass_at_k(len(cands), c, k) for k in task.ks}
    for m, v in got.items():
      values[m].append(v)
    records.append({'id': ex['id'], 'prompt': p, 'completions': cands,
                    'outcomes': [{'status': r.status, 'detail': r.detail[-500:]} for r in runs],
                    'passed': c, **got})
  return records, {m: M.summarize(v) for m, v in values.items()}


def _perplexity(model, task, style, examples, prompts):
  scores = model.loglikelihood_rolling(prompts)
  nll = np.array([-lp for lp, _ in scores])
  tokens = np.array([n for _, n in scores])
  nbytes = np.array([len(t.encode('utf-8')) for t in prompts])
  records = [{'id': ex['id'], 'nll': float(a), 'tokens': int(b), 'bytes': int(c)}
             for ex, a, b, c in zip(examples, nll, tokens, nbytes)]
  # Corpus-level ratios (total nats over total bytes or tokens), resampled over documents.
  stats = {'bits_per_byte': lambda i: nll[i].sum() / math.log(2) / nbytes[i].sum(),
           'perplexity': lambda i: math.exp(min(nll[i].sum() / tokens[i].sum(), 50.0))}
  idx = np.arange(len(records))
  rng = np.random.default_rng(0)
  boots = rng.integers(0, len(idx), size=(1000, len(idx)))
  summary = {}
  for m in task.metrics:
    draws = np.array([stats[m](b) for b in boots])
    summary[m] = {'mean': float(stats[m](idx)), 'ci_low': float(np.quantile(draws, 0.025)),
                  'ci_high': float(np.quantile(draws, 0.975)), 'n': len(idx)}
  return records, summary


KIND_RUNNERS = {'multiple_choice': _multiple_choice, 'generate': _generate, 'code': _code,
                'perplexity': _perplexity}


def flat_metrics(results: dict) -> dict[str, float]:
  """{'eval/<spec>/<metric>': mean} for metrics.jsonl and TensorBoard."""
  return {f'eval/{spec}/{m}': v['mean'] for spec, r in results['tasks'].items()
          for m, v in r['metrics'].items()}


def summary_table(results: dict) -> str:
  """A Markdown table: one row per task variant and metric, with the 95% interval."""
  rows = ['| task | prompting | metric | score [95% CI] | n |', '|---|---|---|---|---|']
  for spec, r in results['tasks'].items():
    for m, v in r['metrics'].items():
      rows.append(f'| {r["task"]} | {r["style"]} | {m} | {v["mean"]:.3f} '
                  f'[{v["ci_low"]:.3f}, {v["ci_high"]:.3f}] | {v["n"]} |')
  return '\n'.join(rows)

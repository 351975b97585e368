"""Best-of-N / rejection sampling: N samples per prompt from a workdir's model, scored by a rule,
a reward model or the model's own log-probability; the best of each prompt whose score clears
--min_score is written as SFT records ({"prompt", "completion", "score"}, train/sft_data.py).

  python -m launch.rejection_sample --workdir=runs/tiny_sft --task=stdlib_functions \
      --n=8 --scorer=reward:runs/tiny_rm --out=kept.jsonl --metric=parses
  python -m launch.rejection_sample --workdir=runs/tiny_sft --prompts=prompts.jsonl \
      --scorer=rule:parses --min_score=1 --out=kept.jsonl

Prompts: --prompts (JSONL with "prompt", and "answer" for rules that check one, e.g.
exact_match) or --task (a bundled SFT task's --split). With
--metric (a rule, train/rewards.py) it also prints best-of-N's value of that metric as N grows:
N' = 1, 2, 4, ... up to --n, the best-scored of the first N' samples. --pairs_out writes
(best, worst) pairs as preference records (train/preference_data.py): with an AI judge as the
scorer, that is RLAIF's labelling for DPO or a reward model.
"""
from __future__ import annotations

import json

from absl import flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The policy: a palmax workdir.')
_PROMPTS = flags.DEFINE_string('prompts', None, 'JSONL file of {"prompt": ...} records.')
_TASK = flags.DEFINE_string('task', None, 'A bundled SFT task (train/sft_tasks.py) for prompts.')
_SPLIT = flags.DEFINE_string('split', 'train', "The bundled task's split.")
_LIMIT = flags.DEFINE_integer('limit', None, 'At most this many prompts.')
_N = flags.DEFINE_integer('n', 8, 'Samples per prompt.')
_SCORER = flags.DEFINE_string('scorer', None,
                              'rule:NAME, reward:WORKDIR, judge:WORKDIR[:RUBRIC] or logprob.')
_MIN_SCORE = flags.DEFINE_float('min_score', None, 'Keep a prompt only if its best scores this.')
_METRIC = flags.DEFINE_string('metric', None, 'A rule to report best-of-N against N with.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 128, 'Tokens per sample.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_OUT = flags.DEFINE_string('out', None, 'Where the kept records go (JSONL).')
_PAIRS_OUT = flags.DEFINE_string('pairs_out', None,
                                 'Also write preference pairs (best chosen, worst rejected) of '
                                 'prompts whose samples scored differently: labels for DPO or a '
                                 'reward model (RLAIF with --scorer=judge:...).')


def _prompts() -> tuple[list[str], list]:
  """(prompts, their references: a record's "answer", else None)."""
  if bool(_PROMPTS.value) == bool(_TASK.value):
    raise ValueError('give exactly one of --prompts (a JSONL file) or --task (a bundled task)')
  if _TASK.value:
    from train import sft_tasks
    if _TASK.value not in sft_tasks.SFT_TASKS:
      raise ValueError(f'--task={_TASK.value!r}; expected one of {sorted(sft_tasks.SFT_TASKS)}')
    recs = sft_tasks.SFT_TASKS[_TASK.value](_SPLIT.value)
    prompts, refs = [r['prompt'] for r in recs], [r.get('answer') for r in recs]
  else:
    from train import paths
    prompts, refs = [], []
    for rec, where in paths.read_jsonl(_PROMPTS.value, '--prompts file'):
      if not isinstance(rec, dict) or not isinstance(rec.get('prompt'), str) or not rec['prompt']:
        raise ValueError(f'{where}: expected {{"prompt": a non-empty string}}')
      prompts.append(rec['prompt'])
      refs.append(rec.get('answer'))
  if _LIMIT.value:
    return prompts[:_LIMIT.value], refs[:_LIMIT.value]
  return prompts, refs


def _stops() -> dict:
  """A bundled task generates as its evaluation task does (stop strings, no token healing:
  training saw the prompt's own tokens); other prompts stop at a blank line pair."""
  if _TASK.value:
    from train.evaluation import task as task_lib
    try:
      t = task_lib.get(_TASK.value)
      return {'until': tuple(t.until), 'heal': t.heal}
    except ValueError:
      pass
  return {'until': ('\n\n\n',)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from train import best_of_n, rewards
  if not _WORKDIR.value:
    raise ValueError('--workdir is required (the policy to sample from)')
  if not _SCORER.value:
    raise ValueError("--scorer is required: rule:NAME, reward:WORKDIR or logprob")
  if _N.value < 1 or _MAX_TOKENS.value < 1:
    raise ValueError(f'--n and --max_tokens must be >= 1, got {_N.value} and {_MAX_TOKENS.value}')
  if _METRIC.value and _METRIC.value not in rewards.RULES:
    raise ValueError(f'--metric={_METRIC.value!r}; rules: {sorted(rewards.RULES)}')
  prompts, refs = _prompts()
  from train.evaluation.lm import Generation, PalmaxModel
  policy = PalmaxModel.load(_WORKDIR.value)
  try:
    score = rewards.make_scorer(_SCORER.value, policy)
    gen = Generation(n=_N.value, max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
                     seed=_SEED.value, **_stops())
    picks = best_of_n.best_of_n(policy, prompts, _N.value, score, gen,
                                references=refs if any(r is not None for r in refs) else None)
  finally:
    policy.close()
  kept = [p for p in picks if p.best is not None and
          (_MIN_SCORE.value is None or p.score >= _MIN_SCORE.value)]
  print(f'{len(prompts)} prompts x {_N.value} samples scored by {_SCORER.value}: kept '
        f'{len(kept)} (best score mean '
        f'{sum(p.score for p in kept) / max(len(kept), 1):.4f})')
  if _METRIC.value:
    for k, v in best_of_n.curve(picks, rewards.RULES[_METRIC.value]):
      print(f'best-of-{k}: {_METRIC.value} {v:.4f}')
  if _OUT.value:
    from train import paths
    paths.write_text(_OUT.value, ''.join(
        json.dumps({'prompt': p.prompt, 'completion': p.best, 'score': p.score}) + '\n'
        for p in kept))
    print(f'wrote {len(kept)} SFT records to {_OUT.value}')
  if _PAIRS_OUT.value:
    from train import paths
    pairs = best_of_n.preference_pairs(picks)
    paths.write_text(_PAIRS_OUT.value, ''.join(json.dumps(x) + '\n' for x in pairs))
    print(f'wrote {len(pairs)} preference pairs to {_PAIRS_OUT.value}')


if __name__ == '__main__':
  from launch import errors
  errors.run(main)

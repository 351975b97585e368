"""`python -m launch.rejection_sample` as a user runs it: samples from the tiny workdir, scores
them with a rule, writes the kept ones as SFT records that the SFT loader accepts, prints the
best-of-N curve; bad flags are one line."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'launch.rejection_sample', *args], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=600)


def test_kept_samples_are_sft_records_and_the_curve_is_printed(trained_workdir, tmp_path):
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps({'prompt': f'def f{i}(x):\n'}) + '\n' for i in range(3)))
  out = tmp_path / 'kept.jsonl'
  r = _run(f'--workdir={trained_workdir[0]}', f'--prompts={prompts}', '--n=4', '--max_tokens=6',
           '--scorer=logprob', '--metric=parses', f'--out={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert '3 prompts x 4 samples scored by logprob: kept 3' in r.stdout
  assert [line.split(':')[0] for line in r.stdout.splitlines() if line.startswith('best-of-')] == [
      'best-of-1', 'best-of-2', 'best-of-4']
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [x['prompt'] for x in records] == [f'def f{i}(x):\n' for i in range(3)]
  from train import sft_data
  from train.tokenizer import load_workdir_tokenizer
  tok = load_workdir_tokenizer(trained_workdir[0])
  from model.inference.chat import PalmaxChat
  for rec in records:
    assert rec['score'] < 0   # A mean log-probability.
    if rec['completion'].strip():
      sft_data.record_segments(rec, tok, PalmaxChat(tok), 'kept')


def test_an_ai_judge_labels_preference_pairs(trained_workdir, tmp_path):
  """RLAIF's labelling: a judge model (here the tiny model itself) grades the samples against a
  rubric; best over worst become preference records the DPO loader reads."""
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps({'prompt': f'def g{i}(x):\n'}) + '\n' for i in range(2)))
  pairs = tmp_path / 'pairs.jsonl'
  r = _run(f'--workdir={trained_workdir[0]}', f'--prompts={prompts}', '--n=3', '--max_tokens=5',
           '--temperature=1.0', f'--scorer=judge:{trained_workdir[0]}:correctness',
           f'--pairs_out={pairs}')
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in pairs.read_text().splitlines()]
  assert f'wrote {len(records)} preference pairs' in r.stdout and records
  from model.inference.chat import PalmaxChat
  from train import preference_data as pd
  from train.tokenizer import load_workdir_tokenizer
  tok = load_workdir_tokenizer(trained_workdir[0])
  for rec in records:
    assert rec['chosen'] != rec['rejected']
    pd.record_units(rec, tok, PalmaxChat(tok), 'pairs')


@pytest.mark.parametrize('args,message', [
    ([], '--workdir is required'),
    (['--workdir=W'], '--scorer is required'),
    (['--workdir=W', '--scorer=rule:parses'], 'exactly one of --prompts'),
    (['--workdir=W', '--scorer=rule:parses', '--task=nope'], "--task='nope'"),
    (['--workdir=W', '--scorer=rule:parses', '--n=0', '--task=stdlib_functions'], '--n and'),
    (['--workdir=W', '--scorer=rule:parses', '--metric=nope', '--task=stdlib_functions'],
     "--metric='nope'"),
])
def test_bad_flags_are_one_line(args, message):
  r = _run(*args)
  assert r.returncode != 0
  assert message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]

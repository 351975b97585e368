"""`python -m launch.side_by_side`: pages for raters from two eval runs, their labels scored."""
import json
import os
import subprocess
import sys

import pytest

from train.evaluation import side_by_side as sxs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')


def _sxs(*args):
  return subprocess.run([sys.executable, '-m', 'launch.side_by_side', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)


def _results(path, responses):
  recs = [{'id': f'qa/{i}', 'prompt': f'Q: {i} + 1?\nA:', 'response': r}
          for i, r in enumerate(responses)]
  path.write_text(json.dumps({'tasks': {'qa': {'task': 'qa', 'kind': 'generate',
                                                'records': recs}}}))
  return str(path)


def test_pairs_from_results_and_win_rate(tmp_path):
  a = json.loads(open(_results(tmp_path / 'a.json', ['1', '2', '3'])).read())
  b = json.loads(open(_results(tmp_path / 'b.json', ['x', 'y'])).read())
  items = sxs.pairs_from_results(a, b, 'qa')
  assert [(i['a'], i['b'], i['example']) for i in items] == [('1', 'x', 'qa/0'),
                                                              ('2', 'y', 'qa/1')]
  assert sxs.win_rate(['a', 'a', 'tie', 'b'])['mean'] == pytest.approx(0.625)
  with pytest.raises(ValueError, match="no task 'nope'"):
    sxs.pairs_from_results(a, b, 'nope')
  with pytest.raises(ValueError, match='labels must be in'):
    sxs.win_rate(['A?'])


@pytest.mark.slow
def test_export_then_score_with_a_judge(tmp_path, trained_workdir):
  a = _results(tmp_path / 'a.json', [str(i + 1) for i in range(6)])
  b = _results(tmp_path / 'b.json', ['no idea'] * 6)
  out = tmp_path / 'sxs'
  r = _sxs('--mode=export', f'--a={a}', f'--b={b}', '--task=qa', f'--out={out}')
  assert r.returncode == 0, r.stderr[-2000:]
  assert '6 pairs' in r.stdout
  page = (out / 'pairs.html').read_text()
  assert 'no idea' in page and 'Q: 5 + 1?' in page
  pairs = [json.loads(x) for x in (out / 'pairs.jsonl').read_text().splitlines()]
  labels = tmp_path / 'labels.jsonl'   # What the page's download button writes.
  labels.write_text(''.join(json.dumps({'id': p['id'], 'label': 'a' if i < 5 else 'tie'}) + '\n'
                            for i, p in enumerate(pairs)))
  r = _sxs('--mode=score', f'--pairs={out}/pairs.jsonl', f'--labels={labels}',
           f'--judge={trained_workdir[0]}')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'A preferred 0.917' in r.stdout and '(a 5, b 0, tie 1)' in r.stdout
  assert "Cohen's kappa" in r.stdout and 'position bias' in r.stdout


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
  a = _results(tmp_path / 'a.json', ['1'])
  (tmp_path / 'broken.json').write_text('{')
  for args, message in [(['--mode=export', f'--a={a}'], '--mode=export needs --b'),
                        (['--mode=export', f'--a={a}', f'--b={tmp_path}/broken.json',
                          '--task=qa', f'--out={tmp_path}/o'], 'broken.json is not JSON'),
                        (['--mode=export', f'--a={a}', f'--b={a}', '--task=qb',
                          f'--out={tmp_path}/o'], "no task 'qb'"),
                        ([], '--mode is required')]:
    r = _sxs(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: ')
    assert message in r.stderr and 'Traceback' not in r.stderr
  assert not (tmp_path / 'o').exists()

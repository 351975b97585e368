"""colab/alignment.ipynb: committed without outputs, and runs end to end on the trained fixture
(reward model, DPO, arithmetic SFT then GRPO, best-of-N), plotting as it goes."""
import math
import os
import re
import shutil

import pytest

from tests.colab.notebooks import ROOT, assert_committed_clean, read, stream_text

CELLS = ('install', 'parameters', 'base', 'sft', 'rm', 'dpo', 'arith', 'grpo', 'bon', 'summary')


def test_notebook_is_valid_and_has_no_outputs():
  nb = read('alignment.ipynb')
  assert_committed_clean(nb)
  ids = [c.id for c in nb.cells]
  assert len(set(ids)) == len(ids) and set(CELLS) <= set(ids)
  (params,) = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert 'GRPO_STEPS' in params.source and 'PALMAX_NB_WORKDIR' in params.source


def _images(cell) -> int:
  return sum('image/png' in o.get('data', {}) for o in cell.outputs)


@pytest.mark.slow
def test_notebook_aligns_and_plots(tmp_path, monkeypatch, trained_workdir):
  from ipykernel import kernelspec
  from nbclient import NotebookClient

  kernelspec.install(kernel_name='python3', prefix=str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter' / 'share' / 'jupyter'))
  workdir = str(tmp_path / 'w')
  shutil.copytree(trained_workdir[0], workdir)
  steps = {k: '3' for k in ('SFT', 'RM', 'DPO', 'ARITH', 'GRPO')}
  env = dict(os.environ, PALMAX_REPO=ROOT, PALMAX_NB_WORKDIR=workdir, JAX_PLATFORMS='cpu',
             PALMAX_NB_BATCH='8', PALMAX_NB_EVAL_LIMIT='2', PALMAX_NB_MAX_NEW_TOKENS='16',
             PALMAX_NB_BEST_OF='2', PALMAX_NB_BEST_OF_PROMPTS='2', MPLBACKEND='Agg',
             PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             **{f'PALMAX_NB_{k}_STEPS': v for k, v in steps.items()})
  env['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'
  nb = read('alignment.ipynb')
  client = NotebookClient(nb, kernel_name='python3', timeout=600,
                          resources={'metadata': {'path': ROOT}})
  client.execute(env=env)
  cells = {c.id: c for c in nb.cells if c.cell_type == 'code'}
  text = {k: stream_text(c) for k, c in cells.items()}

  number = r'(\d+\.\d+)'
  assert re.search(rf'SFT policy: parses {number} on the held-out functions', text['sft'])
  acc = re.findall(rf'step (\d+) {number}', text['rm'].split('held-out accuracy:')[1])
  assert [int(s) for s, _ in acc] == [1, 2, 3] and all(0 <= float(a) <= 1 for _, a in acc)
  assert re.search(rf'DPO policy: parses {number} \(SFT {number}\)', text['dpo'])
  assert re.search(rf'arithmetic SFT policy: exact match {number}', text['arith'])
  grpo = re.search(r'GRPO held-out exact match: (.*) \(SFT policy (\d+\.\d+)\)', text['grpo'])
  assert grpo and [int(s) for s in re.findall(r'step (\d+)', grpo[1])] == [1, 2, 3], text['grpo']
  for cell, n in (('rm', 1), ('dpo', 1), ('grpo', 1), ('bon', 1)):
    assert _images(cells[cell]) == n, cell
  for line in ('code: parses, best-of-N by reward model: N=1 ',
               'code: parses, best-of-N by rule (oracle): N=1 ',
               'arithmetic: exact match, best-of-N by log-prob: N=1 ',
               'arithmetic: exact match, best-of-N by rule (oracle): N=1 '):
    assert line in text['bon'], line
  table = [r.split(' | ') for r in text['summary'].splitlines() if r.startswith('| ')]
  assert table[0] == ['| task', 'policy', 'held-out metric |']
  values = [float(r[2].rstrip(' |')) for r in table[1:]]
  assert len(values) == 8 and all(0 <= v <= 1 and math.isfinite(v) for v in values)

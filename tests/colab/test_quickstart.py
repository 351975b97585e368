"""colab/quickstart.ipynb: committed without outputs, and runs end to end on a tiny corpus."""
import json
import os
import sys

import pytest

from tests.colab.notebooks import ROOT, assert_committed_clean, read
from tests.conftest import write_code_corpus

STEPS = 4


def _read():
  return read('quickstart.ipynb')


def _cell(nb, tag):
  (cell,) = [c for c in nb.cells if tag in c.metadata.get('tags', [])]
  return cell


def test_notebook_is_valid_and_has_no_outputs():
  nb = _read()
  assert_committed_clean(nb, compiles=False)
  assert 'STEPS' in _cell(nb, 'parameters').source
  # Every code cell is valid Python once IPython has expanded its magics (%pip).
  from IPython.core.inputtransformer2 import TransformerManager
  for cell in nb.cells:
    if cell.cell_type == 'code':
      compile(TransformerManager().transform_cell(cell.source), cell.id, 'exec')


@pytest.mark.slow
def test_notebook_trains_plots_and_samples(tmp_path, monkeypatch):
  from ipykernel import kernelspec
  from nbclient import NotebookClient

  # A `python3` kernelspec that runs this interpreter (JUPYTER_PATH has the highest priority).
  kernelspec.install(kernel_name='python3', prefix=str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter' / 'share' / 'jupyter'))
  with open(tmp_path / 'jupyter' / 'share' / 'jupyter' / 'kernels' / 'python3' / 'kernel.json') as f:
    assert json.load(f)['argv'][0] == sys.executable

  workdir = tmp_path / 'workdir'
  env = dict(os.environ, PALMAX_REPO=ROOT, PALMAX_NB_STEPS=str(STEPS),
             PALMAX_NB_DATA=write_code_corpus(tmp_path / 'corpus'),
             PALMAX_NB_WORKDIR=str(workdir), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  nb = _read()
  client = NotebookClient(nb, kernel_name='python3', timeout=300,
                          resources={'metadata': {'path': ROOT}})
  client.execute(env=env)  # Raises CellExecutionError (with the traceback) if a cell fails.

  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not [o for o in cell.outputs if o.output_type == 'error'], cell.id
  (install,) = [c for c in nb.cells if c.id == 'install']
  install_out = ''.join(o.get('text', '') for o in install.outputs)
  assert 'skipping the install' in install_out  # The venv already has palmax's dependencies.

  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, STEPS + 1))
  assert rows[-1]['step'] == STEPS and rows[-1]['eval_bits_per_byte'] > 0
  assert (workdir / 'curves.png').stat().st_size > 0

  sample = _cell(nb, 'sample')
  text = ''.join(o.get('text', '') for o in sample.outputs if o.output_type == 'stream')
  blocks = [b.strip('\n') for b in text.split('-' * 40) if b.strip()]
  assert len(blocks) == 3, text  # Two samples, then the greedy one.
  blocks[2] = blocks[2].removeprefix('greedy:\n')
  prompt = 'def fibonacci(n):'
  assert all(b.startswith(prompt) for b in blocks), text

"""colab/serving.ipynb: committed without outputs, and runs end to end on the trained fixture."""
import os
import shutil
import sys

import pytest

from tests.colab.notebooks import ROOT, assert_committed_clean, read, stream_text


def _read():
  return read('serving.ipynb')


_text = stream_text


def test_notebook_is_valid_and_has_no_outputs():
  nb = _read()
  assert_committed_clean(nb)


@pytest.mark.slow
def test_notebook_samples_with_every_option_and_serves(tmp_path, monkeypatch, trained_workdir):
  from ipykernel import kernelspec
  from nbclient import NotebookClient

  kernelspec.install(kernel_name='python3', prefix=str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter' / 'share' / 'jupyter'))
  workdir = str(tmp_path / 'w')
  shutil.copytree(trained_workdir[0], workdir)
  env = dict(os.environ, PALMAX_REPO=ROOT, PALMAX_NB_WORKDIR=workdir, JAX_PLATFORMS='cpu',
             PALMAX_NB_PROMPT='def func_1(x):\n', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  nb = _read()
  client = NotebookClient(nb, kernel_name='python3', timeout=300,
                          resources={'metadata': {'path': ROOT}})
  client.execute(env=env)
  assert sys.executable  # The kernelspec runs this interpreter (see test_quickstart.py).

  cells = {c.id: c for c in nb.cells}
  samplers = _text(cells['samplers'])
  for name in ('[greedy]', '[temperature 0.8, top_p 0.95]', '[top_k 20]', '[min_p 0.1]',
               '[penalties]', '[best_of=4, n=1 (mean log-prob)]', '[stop at a newline]',
               '[beam search, width 3]'):
    assert name in samplers, name
  assert samplers.count('[n=2]') == 2 and samplers.count('[beam search, width 3]') == 2
  assert samplers.count('top: ') == 4       # 4 tokens, each with its top-3 alternatives.
  server = _text(cells['server'])
  assert "models: ['tiny']" in server and 'completion: ' in server and 'chat stream: ' in server
  assert 'palmax_time_to_first_token_seconds_count' in server
  assert 'pages in use after shutdown: 0' in _text(cells['shutdown'])

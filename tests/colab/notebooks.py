"""What the notebook tests share: reading a committed notebook, checking it is committed clean,
and the text a cell printed."""
import os

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(name: str):
  """colab/<name> as an nbformat v4 notebook."""
  return nbformat.read(os.path.join(ROOT, 'colab', name), as_version=4)


def assert_committed_clean(nb, compiles: bool = True) -> None:
  """Valid, every code cell without outputs or an execution count (committed unrun) and, with
  `compiles`, valid Python (notebooks with IPython magics check that themselves)."""
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, cell.id
      if compiles:
        compile(cell.source, cell.id, 'exec')


def stream_text(cell) -> str:
  """Everything the cell printed to stdout/stderr."""
  return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')

"""Fixtures of the tests under tests/model/ (the repository-wide ones are in tests/conftest.py)."""
import pytest

from model.inference.loop import EngineLoop
from tests.model.serving_util import KEY, Served, live_server


@pytest.fixture(scope='session')
def served(trained_workdir):
  """The trained tiny workdir behind two live servers sharing one engine: one keyed, one open."""
  from launch.workdir import load_completer
  completer, engine = load_completer(trained_workdir[0],
                                     serve_overrides=dict(num_slots=4, max_queue=64))
  engine.warmup()
  loop = EngineLoop(engine).start()
  try:
    with live_server(completer, KEY) as keyed, \
        live_server(completer, None, metrics=keyed.api.metrics) as open_:
      yield Served(keyed, open_, completer, engine, loop)
  finally:
    loop.stop()

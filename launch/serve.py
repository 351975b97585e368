"""Serve a workdir (a training run or an imported HF checkpoint) over an OpenAI-compatible API.

  python -m launch.serve --workdir=runs/tiny [--host=127.0.0.1 --port=8000 --api_key=KEY]

Then e.g. `openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='KEY')`. Routes and
errors: model/inference/openai_server.py; engine settings: config.serve (flags override).
"""
from __future__ import annotations

import os

from absl import flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'A palmax workdir.', required=True)
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Bind address (0.0.0.0 exposes the server).')
_PORT = flags.DEFINE_integer('port', 8000, 'TCP port.')
_API_KEY = flags.DEFINE_string('api_key', None, 'Require "Authorization: Bearer KEY" '
                               '(default: $PALMAX_API_KEY if set, else no auth).')
_MODEL_NAME = flags.DEFINE_string('model_name', None, 'Name in /v1/models (default: the '
                                  "workdir's directory name).")
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_SLOTS = flags.DEFINE_integer('num_slots', None, 'config.serve.num_slots override.')
_PAGE = flags.DEFINE_integer('page_size', None, 'config.serve.page_size override.')
_PAGES = flags.DEFINE_integer('num_pages', None, 'config.serve.num_pages override.')
_CHUNK = flags.DEFINE_integer('prefill_chunk', None, 'config.serve.prefill_chunk override.')
_QUEUE = flags.DEFINE_integer('max_queue', None, 'config.serve.max_queue override.')
_CACHED = flags.DEFINE_integer('max_cached_pages', None, 'config.serve.max_cached_pages override.')
_PREFIX = flags.DEFINE_bool('prefix_cache', None, 'config.serve.prefix_cache override.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import uvicorn
  from launch.workdir import load_completer
  from model.inference.loop import EngineLoop
  from model.inference.openai_server import OpenAIServer

  _check_port(_HOST.value, _PORT.value)   # Before minutes of loading and compiling.
  overrides = dict(num_slots=_SLOTS.value, page_size=_PAGE.value, num_pages=_PAGES.value,
                   prefill_chunk=_CHUNK.value, max_queue=_QUEUE.value,
                   max_cached_pages=_CACHED.value, prefix_cache=_PREFIX.value)
  completer, engine = load_completer(_WORKDIR.value, _STEP.value, overrides)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value))
  server = OpenAIServer(completer, name, _API_KEY.value or os.environ.get('PALMAX_API_KEY'))
  print('compiling every step shape ...', flush=True)
  engine.warmup()
  loop = EngineLoop(engine).start()
  print(f'serving {name!r} on http://{_HOST.value}:{_PORT.value}/v1 '
        f'({engine.cfg.num_slots} slots, {engine.pool.num_pages - 1} pages of '
        f'{engine.cfg.page_size} tokens)', flush=True)
  try:
    uvicorn.run(server.app, host=_HOST.value, port=_PORT.value, log_level='warning')
  finally:
    loop.stop()


def _check_port(host: str, port: int) -> None:
  """ValueError naming the flags if nothing can listen on host:port (uvicorn would say so only
  after the model is loaded and compiled, and exit 3 with its own log line)."""
  import socket
  with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # As uvicorn binds.
    try:
      s.bind((host, port))
    except OSError as e:
      raise ValueError(f'--host={host} --port={port}: cannot listen there: '
                       f'{e.strerror or e}') from None


if __name__ == '__main__':
  from launch import errors
  errors.run(main)

"""Shared pieces of the OpenAI-server tests: a live uvicorn on 127.0.0.1 over an OpenAIServer,
clients and helpers (the `served` fixture is in tests/model/conftest.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time

import pytest

openai = pytest.importorskip('openai')
uvicorn = pytest.importorskip('uvicorn')
try:
  import httpx
except ImportError:  # This venv's openai client ships the httpx2 fork (same API).
  httpx = pytest.importorskip('httpx2')

from model.inference.loop import EngineLoop  # noqa: E402
from model.inference.openai_server import OpenAIServer  # noqa: E402

MODEL = 'tiny'
KEY = 'sk-palmax-test'
AUTH = {'Authorization': f'Bearer {KEY}'}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Live:
  """One uvicorn server (in a thread of this process) over an OpenAIServer."""
  api: OpenAIServer
  port: int

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  def client(self, api_key: str = KEY, **kw) -> 'openai.OpenAI':
    return openai.OpenAI(base_url=f'{self.url}/v1', api_key=api_key, max_retries=0,
                         timeout=kw.pop('timeout', 120), **kw)

  def http(self, headers=AUTH, timeout: float = 120) -> 'httpx.Client':
    return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

  def health(self) -> dict:
    return httpx.get(f'{self.url}/health', timeout=10).json()


@contextlib.contextmanager
def live_server(completer, api_key=None, metrics=None):
  api = OpenAIServer(completer, MODEL, api_key, metrics=metrics)
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(api.app, host='127.0.0.1', port=port,
                                         log_level='warning', lifespan='off'))
  thread = threading.Thread(target=server.run, name=f'uvicorn-{port}', daemon=True)
  thread.start()
  live = Live(api, port)
  deadline = time.monotonic() + 30
  while True:
    try:
      if httpx.get(f'{live.url}/health', timeout=2).status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert thread.is_alive() and time.monotonic() < deadline, 'uvicorn did not start'
    time.sleep(0.05)
  try:
    yield live
  finally:
    server.should_exit = True
    thread.join(15)


@dataclasses.dataclass
class Served:
  keyed: Live      # api_key=KEY (every helper sends it)
  open: Live       # no api_key, same engine and metrics
  completer: object
  engine: object
  loop: EngineLoop

  def wait_idle(self, timeout: float = 5.0) -> dict:
    """/health once nothing runs or waits (cancellations land on the next engine step)."""
    deadline = time.monotonic() + timeout
    while True:
      h = self.keyed.health()
      if (h['active'] == 0 and h['waiting'] == 0 and h['pages_in_use'] == 0) or \
          time.monotonic() > deadline:
        return h
      time.sleep(0.02)


@contextlib.contextmanager
def slowed(engine, seconds: float):
  """Every engine step takes `seconds` longer (a slow model), so a request outlives a client."""
  step = engine.step

  def slow_step():
    time.sleep(seconds)
    return step()

  engine.step = slow_step
  try:
    yield
  finally:
    del engine.step


def encode(served, text: str) -> list[int]:
  tok = served.completer.tokenizer
  return [tok.doc_start_id] + tok.encode(text)


def greedy(client, prompt, **kw):
  return client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)


def stream_texts(chunks, chat: bool) -> tuple[dict, dict, list]:
  """{index: text}, {index: finish_reason} and the chunks, from a streamed response."""
  texts, finish, seen = {}, {}, []
  for ch in chunks:
    seen.append(ch)
    for c in ch.choices:
      piece = (c.delta.content or '') if chat else c.text
      texts[c.index] = texts.get(c.index, '') + piece
      if c.finish_reason is not None:
        assert c.index not in finish, f'choice {c.index} finished twice'
        finish[c.index] = c.finish_reason
  return texts, finish, seen


# -- the openai client ------------------------------------------------------------------------

"""Runs an Engine's steps on a background thread: a server submits from its request handlers,
the loop steps while there is work and sleeps when idle. A step that raises stops nothing but
the sequences it was running: they end with finish 'error' and the loop goes on."""
from __future__ import annotations

import logging
import threading

from model.inference.engine import Engine


class EngineLoop:
  def __init__(self, engine: Engine):
    self.engine = engine
    self._wake = threading.Event()
    self._stop = threading.Event()
    self.errors = 0
    self._thread = threading.Thread(target=self._run, name='palmax-engine', daemon=True)
    submit, cancel = engine.submit, engine.cancel

    def submit_and_wake(*a, **k):
      seq_id = submit(*a, **k)
      self._wake.set()
      return seq_id

    def cancel_and_wake(seq_id):
      cancel(seq_id)
      self._wake.set()

    engine.submit, engine.cancel = submit_and_wake, cancel_and_wake

  def start(self) -> 'EngineLoop':
    self._thread.start()
    return self

  def stop(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self._wake.set()
    self._thread.join(timeout)

  def _run(self) -> None:
    while not self._stop.is_set():
      if not self.engine.has_work():
        self._wake.wait(0.5)
        self._wake.clear()
        continue
      try:
        self.engine.step()
      except Exception:  # Keep serving: fail the running sequences, not the server.
        logging.exception('engine step failed; ending its sequences with an error')
        self.errors += 1
        self.engine.abort_running('error')

"""Prometheus metrics of a serving engine (prometheus_client: the exposition format, histogram
buckets and thread safety are its job). One registry per server, so tests can run several.

Gauges read the engine when scraped (queue length, active slots, pages used / cached / total,
prefix-cache hit rate, tokens/s over the last 10 s); histograms are fed by the engine thread
(time to first token, inter-token latency); a counter counts answered requests by status.
"""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST   # What /metrics answers with.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
  """Also the engine's `observer` (first_token / next_token callbacks)."""

  def __init__(self, engine, window_s: float = 10.0):
    self.engine, self.window_s = engine, window_s
    self.registry = r = CollectorRegistry()
    self._times: collections.deque[float] = collections.deque()
    self._lock = threading.Lock()
    stat = lambda key: (lambda: float(engine.stats()[key]))
    for name, key, doc in (('queue_length', 'waiting', 'Sequences waiting for a slot'),
                           ('active_slots', 'active', 'Slots decoding or prefilling'),
                           ('slots', 'slots', 'Decode slots'),
                           ('cache_pages_used', 'pages_in_use', 'KV pages referenced'),
                           ('cache_pages_cached', 'pages_cached', 'Idle pages kept by the prefix cache'),
                           ('cache_pages_total', 'pages', 'Allocatable KV pages'),
                           ('prefix_cache_hit_rate', 'prefix_hit_rate',
                            'Prompt tokens served from the prefix cache / prompt tokens')):
      Gauge(f'palmax_{name}', doc, registry=r).set_function(stat(key))
    Gauge('palmax_tokens_per_second', 'Generated tokens per second over the last window',
          registry=r).set_function(self._rate)
    Gauge('palmax_generated_tokens', 'Tokens generated since start',
          registry=r).set_function(stat('tokens_generated'))
    self.ttft = Histogram('palmax_time_to_first_token_seconds', 'Submit to first token',
                          buckets=_LATENCY_BUCKETS, registry=r)
    self.itl = Histogram('palmax_inter_token_latency_seconds', 'Between consecutive tokens',
                         buckets=_LATENCY_BUCKETS, registry=r)
    self.requests = Counter('palmax_requests', 'Answered HTTP generation requests', ['status'],
                            registry=r)
    engine.observer = self

  def first_token(self, seconds: float) -> None:
    self.ttft.observe(seconds)
    self._tick()

  def next_token(self, seconds: float) -> None:
    self.itl.observe(seconds)
    self._tick()

  def _tick(self) -> None:
    now = time.monotonic()
    with self._lock:
      self._times.append(now)
      while self._times and self._times[0] < now - self.window_s:
        self._times.popleft()

  def _rate(self) -> float:
    now = time.monotonic()
    with self._lock:
      while self._times and self._times[0] < now - self.window_s:
        self._times.popleft()
      return len(self._times) / self.window_s

  def render(self) -> bytes:
    return generate_latest(self.registry)

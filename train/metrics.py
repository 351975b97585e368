"""Metrics sinks: a JSONL file, TensorBoard event files and a one-line console progress report.

Only process 0 writes, so multi-host runs log once.
"""
from __future__ import annotations

import json
import math
import time

import jax
import numpy as np

from train import paths


class MetricsWriter:
  """`write(step, {name: float})` appends to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/.

  On an object store (`gs://...`), which cannot append, the JSONL object is rewritten at most
  every `flush_seconds` and at `close()`, and TensorBoard event files go through the same path
  layer (`train/paths.py`)."""

  def __init__(self, workdir: str, tensorboard: bool = True, flush_seconds: float = 30.0):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    paths.makedirs(workdir)
    self._path = paths.join(workdir, 'metrics.jsonl')
    self._remote = paths.is_remote(workdir)
    self._pending: list[str] = []
    self._flush_seconds, self._flushed = flush_seconds, time.monotonic()
    if not self._remote:
      self._jsonl = open(self._path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      if self._remote:
        _register_object_store_events(workdir)
      self._tb = SummaryWriter(paths.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({'step': int(step), 'time': time.time(), **clean}) + '\n'
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._pending.append(line)
      if time.monotonic() - self._flushed > self._flush_seconds:
        self._flush_remote()
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def _flush_remote(self) -> None:
    if self._pending:
      paths.append_text(self._path, ''.join(self._pending))
      self._pending = []
    self._flushed = time.monotonic()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._jsonl is not None:
      self._jsonl.close()
    else:
      self._flush_remote()
    if self._tb is not None:
      self._tb.close()


class _ObjectEventFile:
  """A TensorBoard event file on an object store: buffered, the whole object rewritten on flush."""

  def __init__(self, path: str):
    self.path, self._data = path, bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    paths.write_bytes(self.path, bytes(self._data))

  def close(self) -> None:
    self.flush()


class _ObjectEventFiles:
  def open(self, path: str) -> _ObjectEventFile:
    return _ObjectEventFile(path)

  def directory_check(self, path: str) -> None:
    del path   # Object stores need no directories.


def _register_object_store_events(workdir: str) -> None:
  from tensorboardX import record_writer
  record_writer.register_writer_factory(workdir.split(':')[0], _ObjectEventFiles())


def flatten(metrics: dict) -> dict[str, float]:
  """Scalars pass through; per-layer arrays become one scalar each, e.g. moe_load [M, E] ->
  moe_load/layer0/expert3, moe_dropped [M] -> moe_dropped/layer0. MoE layers also get their
  balance ratio moe_load_max_over_min/layer{m} (1 = perfectly balanced)."""
  out = {}
  for name, v in metrics.items():
    a = np.asarray(v, np.float64)
    if a.ndim == 0:
      out[name] = float(a)
      continue
    for idx in np.ndindex(a.shape):
      key = '/'.join(f'{label}{i}' for label, i in zip(('layer', 'expert'), idx))
      out[f'{name}/{key}'] = float(a[idx])
    if name == 'moe_load':
      for m, load_E in enumerate(a):
        out[f'moe_load_max_over_min/layer{m}'] = float(load_E.max() / max(load_E.min(), 1e-12))
  return out


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


# Objective metrics worth a place on the progress line (preference and reward objectives).
_SHOWN = (('rewards/accuracies', 'acc'), ('accuracy', 'acc'), ('rewards/margins', 'margin'),
          ('kl', 'kl'), ('reward', 'reward'))


def progress_line(step: int, total: int, m: dict, eta_s: float) -> str:
  balance = [v for k, v in m.items() if k.startswith('moe_load_max_over_min/')]
  moe = (f'  aux {m["moe_aux_loss"]:.4f}  load max/min {max(balance):.2f}' if balance else '')
  extra = ''.join(f'  {short} {m[k]:.3f}' for k, short in _SHOWN if k in m)
  return (f'step {step:>6}/{total}  loss {m["loss"]:.4f}{extra}  lr {m["lr"]:.2e}  '
          f'{m["tokens_per_s"]:,.0f} tok/s  MFU {100 * m["mfu"]:.1f}%{moe}  ETA {format_duration(eta_s)}')


def eval_line(e: dict) -> str:
  """'loss 2.1234  ppl 8.37  bits/byte 1.2345' (no ppl or bits/byte where they mean nothing:
  preference data), then the objective's other eval metrics."""
  out = f'loss {e["eval_loss"]:.4f}'
  if math.isfinite(e.get('eval_bits_per_byte', float('nan'))):
    out += f'  ppl {e["eval_perplexity"]:.2f}  bits/byte {e["eval_bits_per_byte"]:.4f}'
  for k, v in e.items():
    if k not in ('eval_loss', 'eval_perplexity', 'eval_bits_per_byte'):
      out += f'  {k[len("eval_"):]} {v:.4f}'
  return out

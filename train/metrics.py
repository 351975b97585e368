"""Metrics sinks: a JSONL file, TensorBoard event files and a one-line console progress report.

Only process 0 writes, so multi-host runs log once.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax


class MetricsWriter:
  """`write(step, {name: float})` appends to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **clean}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


def progress_line(step: int, total: int, m: dict, eta_s: float) -> str:
  return (f'step {step:>6}/{total}  loss {m["loss"]:.4f}  lr {m["lr"]:.2e}  '
          f'{m["tokens_per_s"]:,.0f} tok/s  MFU {100 * m["mfu"]:.1f}%  ETA {format_duration(eta_s)}')

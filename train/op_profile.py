"""Where a compiled step spends its time: XLA op durations from a profiler trace, grouped by the
`jax.named_scope` each op came from (embed, attention, mlp, head_loss, optimizer, ...).

    compiled = jax.jit(step).lower(*args).compile()
    ms = breakdown(compiled.as_text(), lambda: compiled(*args), steps=3,
                   scopes=('attention', 'mlp', ...))    # {scope: ms per step}

The profiler (`jax.profiler.trace`, read back with `jax.profiler.ProfileData`) names each op
that ran by its HLO instruction (`hlo_op`); the compiled module's text maps every instruction,
and every instruction inside a fusion, to its `op_name`, the jax name stack where the scope
names appear (also on the backward ops, under `transpose(jvp(...))`). A fusion is assigned to
the scope most of its instructions carry; an op under no listed scope counts as 'other'.
"""
from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Sequence

import jax

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+[({]')


def instruction_scopes(hlo_text: str, scopes: Sequence[str]) -> dict[str, str]:
  """HLO instruction name -> the first of `scopes` found in its op_name path (for fusions and
  calls: the most common scope of the instructions they contain), else 'other'."""
  # A scope appears as a path part, possibly inside transforms: 'transpose(jvp(mlp))/dot'.
  patterns = [(s, re.compile(rf'(^|[/(]){re.escape(s)}($|[/)])')) for s in scopes]

  def scope_of(op_name: str) -> str | None:
    for s, pattern in patterns:
      if pattern.search(op_name):
        return s
    return None

  own: dict[str, str | None] = {}
  calls: dict[str, list[str]] = {}
  members: dict[str, list[str]] = collections.defaultdict(list)
  computation = None
  for line in hlo_text.splitlines():
    if line.rstrip().endswith('{') and '=' not in line.split('(')[0]:
      m = _COMPUTATION.match(line)
      computation = m.group(1) if m else None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name = m.group(1)
    op = _OP_NAME.search(line)
    own[name] = scope_of(op.group(1)) if op else None
    if computation:
      members[computation].append(name)
    c = _CALLS.findall(line)
    if c:
      calls[name] = [x.strip().lstrip('%') for group in c for x in group.split(',') if x.strip()]

  resolved: dict[str, str] = {}

  def resolve(name: str, depth: int = 0) -> str:
    if name in resolved:
      return resolved[name]
    votes = collections.Counter()
    if own.get(name):
      votes[own[name]] += 1
    for comp in calls.get(name, ()) if depth < 8 else ():
      for inner in members.get(comp, ()):
        s = own.get(inner) if inner not in calls else resolve(inner, depth + 1)
        if s and s != 'other':
          votes[s] += 1
    resolved[name] = votes.most_common(1)[0][0] if votes else 'other'
    return resolved[name]

  return {name: resolve(name) for name in own}


def op_times(run, steps: int) -> dict[str, float]:
  """Seconds per call of each HLO op (by instruction name) over `steps` calls of `run()` (which
  runs the compiled step once and returns what to wait for)."""
  from jax.profiler import ProfileData

  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      jax.block_until_ready(run())
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f'{d}/**/*.xplane.pb', recursive=True))[-1]
    data = ProfileData.from_file(path)
  totals: dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if 'hlo_op' in stats:
          totals[stats['hlo_op']] += ev.duration_ns * 1e-9 / steps
  return dict(totals)


def breakdown(hlo_text: str, run, steps: int, scopes: Sequence[str]) -> dict[str, float]:
  """Milliseconds of op time per step in each of `scopes` (+ 'other'): `run()` calls the
  compiled function whose `as_text()` is `hlo_text`. Op time is summed over threads, so with
  several cores it can exceed the wall time."""
  owner = instruction_scopes(hlo_text, scopes)
  totals: dict[str, float] = collections.defaultdict(float)
  for op, s in op_times(run, steps).items():
    totals[owner.get(op, 'other')] += 1e3 * s
  return {s: totals.get(s, 0.0) for s in (*scopes, 'other')}

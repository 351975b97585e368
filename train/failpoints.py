"""Named points where a fault-injection test may kill the process (as a power cut would).

`PALMAX_FAILPOINT=name:n` makes the n-th arrival at `reach('name')` send SIGKILL to this process:
no handler, no cleanup, no flush. Without the variable `reach` is a dictionary lookup. The points
mark the places where a kill must not lose or corrupt work: tokenizer training and its files, the
token cache, training steps and checkpoint saves (tests/train/test_fault_injection.py).
"""
from __future__ import annotations

import os
import signal

_SPEC = os.environ.get('PALMAX_FAILPOINT', '')
_NAME, _, _COUNT = _SPEC.partition(':')
_seen: dict[str, int] = {}


def reach(name: str) -> None:
  if not _SPEC or name != _NAME:
    return
  _seen[name] = _seen.get(name, 0) + 1
  if _seen[name] == int(_COUNT or 1):
    os.kill(os.getpid(), signal.SIGKILL)

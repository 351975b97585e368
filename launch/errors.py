"""Errors a user can fix get one clear line on stderr and exit code 1, not a traceback.

Set PALMAX_TRACEBACK=1 to see the full traceback anyway.
"""
from __future__ import annotations

import os
import sys
import traceback

from model.config import ConfigError
from model.sharding import ShardingError
from train.checkpoint import CheckpointMismatchError
from train.trainer import TrainingDivergedError

USER_ERRORS = (ConfigError, ShardingError, CheckpointMismatchError, TrainingDivergedError,
               ValueError, FileNotFoundError)


def fail(e: BaseException) -> None:
  if os.environ.get('PALMAX_TRACEBACK'):
    traceback.print_exc()
  print(f'error: {e}', file=sys.stderr)
  sys.exit(1)

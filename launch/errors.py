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


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parser for `app.run(main, flags_parser=parse_flags)`: a config override naming an
  unknown key (`--config.model.num_layer=3`) gets one line, not ml_collections' traceback."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}\nPass --helpfull to list the flags.', file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    print(f'error: bad config override: {msg}', file=sys.stderr)
    sys.exit(1)

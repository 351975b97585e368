"""One error boundary for the command-line tools in launch/: `run(main)` in place of absl's
`app.run(main)`, or `with boundary():` around a tool without absl.

  exit 0    done
  exit 2    an error the user can fix (a config file or value, a missing, unwritable or full path,
            a checkpoint that does not fit): one line `error: ...` on stderr naming the path or
            the config field, no traceback. PALMAX_TRACEBACK=1 prints the traceback too.
  exit 1    an unexpected exception: its traceback, then a line saying it is a bug in palmax.
  exit 130  Ctrl-C where training's own handler does not take it (startup, compilation, a second
            Ctrl-C): one line `interrupted`.

Importing this module does not import jax (the CLIs import it first, and --help stays fast).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import sysconfig
import traceback

USER_ERROR, BUG, INTERRUPTED = 2, 1, 130

# palmax's own error classes, looked up only in modules already imported: a module never imported
# raised nothing, and importing train.trainer here would import jax into every CLI's startup.
_PALMAX_ERRORS = (
    ('model.config', 'ConfigError'), ('model.sharding', 'ShardingError'),
    ('model.pipeline', 'PipelineError'), ('train.checkpoint', 'CheckpointMismatchError'),
    ('train.checkpoint_verify', 'CheckpointCorruptError'),
    ('train.trainer', 'TrainingDivergedError'), ('train.workdir_lock', 'WorkdirLockedError'),
    ('launch.gcloud', 'LaunchError'))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = os.path.join(_ROOT, 'configs') + os.sep   # Users edit and add configs: their code.


class PathError(ValueError):
  """A path from the command line that cannot be used; the message names the flag and path."""


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception classes that end in one line and exit 2 (OSError: ENOSPC, EACCES, ...)."""
  found = [getattr(sys.modules.get(m), n, None) for m, n in _PALMAX_ERRORS]
  return (*(c for c in found if c is not None), ValueError, OSError)


def run(main, argv: list[str] | None = None, flags_parser=None) -> None:
  """`absl.app.run(main)` inside `boundary()`; flags go through `parse_flags` unless given.
  SystemExit passes through untouched, so --help, --helpfull and flag errors behave as absl's."""
  from absl import app
  with boundary():
    app.run(main, argv=argv, flags_parser=flags_parser or parse_flags)


@contextlib.contextmanager
def boundary():
  """Ends the process on any exception from the block: see the exit codes above."""
  try:
    yield
  except KeyboardInterrupt:
    _exit_interrupted()
  except Exception as e:  # noqa: BLE001 - this is the one place that decides how a CLI ends.
    _exit_error(e)


def _exit_interrupted() -> None:
  try:   # A further Ctrl-C while exiting (checkpoint or XLA threads finishing) ends it at once.
    signal.signal(signal.SIGINT, lambda *_: os._exit(INTERRUPTED))
  except ValueError:   # Not the main thread.
    pass
  _flush()
  print('interrupted', file=sys.stderr, flush=True)
  sys.exit(INTERRUPTED)


def _exit_error(e: BaseException) -> None:
  _flush()   # Keep stdout's last lines before the error line.
  line = describe(e)
  if line is None:
    traceback.print_exception(type(e), e, e.__traceback__)
    print(f'error: unexpected {type(e).__name__}; this is a bug in palmax: please report it with '
          'the traceback above', file=sys.stderr, flush=True)
    sys.exit(BUG)
  if os.environ.get('PALMAX_TRACEBACK', '') not in ('', '0'):
    traceback.print_exception(type(e), e, e.__traceback__)
  print(f'error: {line}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR)


def _flush() -> None:
  try:
    sys.stdout.flush()
  except (OSError, ValueError):   # stdout itself is on the full disk (or closed): drop what is
    try:                          # left, or Python's exit fails on it again, with a traceback.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.stdout.flush()
    except (OSError, ValueError):
      pass


def describe(e: BaseException) -> str | None:
  """The one line (after `error: `) for an error the user can fix, or None for a bug."""
  chain = _chain(e)
  for x in chain:   # Full disk anywhere in the chain: orbax and tensorstore wrap it.
    if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or 'No space left on device' in str(x):
      return _no_space(x)
  text = '\n'.join(str(x) for x in chain)
  if 'Failed loading config file' in text or 'Configuration is not available' in text:
    # ml_collections: a config file that could not be read; the OSError is a cause or in the text.
    err = next((x for x in chain if isinstance(x, OSError) and x.strerror and x.filename), None)
    m = re.search(r"\[Errno \d+\] ([^:\n]+): '([^'\n]*)'", text)
    if err is not None:
      return f'cannot load config file {err.filename}: {err.strerror}'
    if m:
      return f'cannot load config file {m.group(2)}: {m.group(1)}'
  if isinstance(e, SyntaxError) and _users(e.filename):
    code = f': {e.text.strip()}' if e.text and e.text.strip() else ''
    return f'{e.filename} line {e.lineno}: {e.msg}{code}'
  known = user_errors()
  # An error raised `from` an OS error is that OS error (orbax's wrappers); an exception raised
  # while handling one (__context__) is not.
  causes = [e]
  while causes[-1].__cause__ is not None and len(causes) < 20:
    causes.append(causes[-1].__cause__)
  for x in [e] + [c for c in causes[1:] if isinstance(c, OSError)]:
    if isinstance(x, known):
      return _os_line(x) if isinstance(x, OSError) else _one_line(x)
  frame = _user_frame(e)
  if frame is not None:   # Raised by the user's code (a config file's get_config), not palmax's.
    return f'{frame.filename} line {frame.lineno}: {type(e).__name__}: {_one_line(e)}'
  if type(e).__name__ == 'XlaRuntimeError' and str(e).startswith('RESOURCE_EXHAUSTED'):
    return (f'out of device memory: {str(e).splitlines()[0]}; lower config.train.batch_size, or '
            'set config.model.remat or a larger mesh (python -m launch.memory checks a config)')
  return None


def _chain(e: BaseException) -> list[BaseException]:
  out = [e]
  while len(out) < 20:
    x = out[-1].__cause__ or (None if out[-1].__suppress_context__ else out[-1].__context__)
    if x is None or x in out:
      break
    out.append(x)
  return out


def _one_line(e: BaseException) -> str:
  text = re.sub(r"\s*\[source locations='[^']*'\]", '', str(e))   # tensorstore's C++ locations
  return re.sub(r'\s*\n\s*', ' ', text.strip()) or type(e).__name__


def _os_line(e: OSError) -> str:
  """'permission denied: PATH' for an OSError from the system; palmax's own messages as they are."""
  if e.errno is None or not e.strerror:
    return _one_line(e)
  paths = ' -> '.join(str(p) for p in (e.filename, e.filename2) if p is not None)
  return f'{e.strerror[0].lower()}{e.strerror[1:]}' + (f': {paths}' if paths else '')


def _no_space(e: BaseException) -> str:
  path = getattr(e, 'filename', None)
  if path is None:   # tensorstore names the file in its message: 'Error writing "PATH": ...'
    m = re.search(r'''["'](/[^"'\n]+)["']''', str(e))
    path = m.group(1) if m else None
  return f'no space left on device{f" writing {path}" if path else ""}{_checkpoint_note()}'


def _checkpoint_note() -> str:
  """What a full disk left of a CLI's local --workdir: its newest complete checkpoint."""
  try:
    from absl import flags
    workdir = flags.FLAGS['workdir'].value
  except Exception:  # noqa: BLE001 - no --workdir flag: nothing to say.
    return ''
  if not isinstance(workdir, str) or '://' in workdir:
    return ''
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  try:   # orbax renames '<step>.orbax-checkpoint-tmp' to '<step>' once a step is complete.
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  except OSError:
    return ''
  if not steps:
    return f'; {directory} holds no complete checkpoint'
  return (f'; the last complete checkpoint (step {max(steps)}) in {directory} is intact: free '
          'some space and run the same command again to resume from it')


def _users(path: str | None) -> bool:
  """True for a file of the user's (a config file), False for palmax's, libraries' and '<...>'."""
  if not path or path.startswith('<'):
    return False
  path = os.path.abspath(path)
  libs = {sysconfig.get_paths()[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')}
  if any(path.startswith(os.path.join(d, '')) for d in libs):
    return False
  return not path.startswith(os.path.join(_ROOT, '')) or path.startswith(_CONFIGS)


def _user_frame(e: BaseException):
  """The innermost frame of `e` outside libraries, when it is in the user's code."""
  libs = {sysconfig.get_paths()[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')}
  for f in reversed(traceback.extract_tb(e.__traceback__)):
    path = os.path.abspath(f.filename)
    if f.filename.startswith('<') or any(path.startswith(os.path.join(d, '')) for d in libs):
      continue
    return f if _users(f.filename) else None
  return None


def check_workdir(path: str, flag: str = '--workdir') -> str:
  """Checks, before any work starts, that `path` is a directory this process can create files in,
  or can be created; a bad --workdir gets one line naming it. Creates nothing (the trainer makes
  the directory once the config is known to be good) and returns `path`. Object-store paths
  (gs://..., see train/paths.py) are returned as they are: they have no local permissions to
  probe, and their filesystem layer reports its own errors."""
  import tempfile
  from train import paths
  if paths.is_remote(path):
    return path
  where = os.path.abspath(path)
  while not os.path.lexists(where) and os.path.dirname(where) != where:
    where = os.path.dirname(where)   # The nearest existing ancestor: the directory made in.
  what = f'{flag}={path}' + ('' if where == os.path.abspath(path) else
                            f' cannot be created: its parent {where}')
  if not os.path.isdir(where):
    raise PathError(f'{what} is a file, not a directory' if os.path.exists(where) else
                    f'{what} is a broken symbolic link')
  # os.access sees permission bits and read-only mounts without writing; the probe file sees
  # what it cannot (root, to whom permission bits do not apply, in /proc; ACLs; quotas). Neither
  # leaves anything behind.
  if not os.access(where, os.W_OK | os.X_OK):
    raise PathError(f'{what} is not writable (permission denied or a read-only filesystem)')
  try:
    fd, probe = tempfile.mkstemp(prefix='.palmax-write-probe-', dir=where)
  except OSError as e:
    raise PathError(f'{what} is not writable: creating a file in it failed '
                    f'({e.strerror or e})') from None
  os.close(fd)
  os.unlink(probe)
  return path


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parser for `app.run(main, flags_parser=parse_flags)`: a config override naming an
  unknown key (`--config.model.num_layer=3`) gets one line naming the whole dotted key and the
  closest known one, not ml_collections' traceback."""
  from absl import flags

  def unknown_key() -> str | None:
    """'config.model.num_layer is not a key; did you mean num_layers?' for the first override
    whose path its config lacks (ml_collections names only the last part, or nothing)."""
    from model.config_rules import closest_key
    for arg in argv[1:]:
      m = re.match(r'--?([A-Za-z_]\w*)\.([^=\s]+)', arg)
      if not m:
        continue
      name, path = m.group(1), m.group(2).split('.')
      if name not in flags.FLAGS and name.startswith('no') and name[2:] in flags.FLAGS:
        name = name[2:]   # --noconfig.train.tensorboard
      if name not in flags.FLAGS:
        continue
      # The config as loaded before the overrides: its file (the flag's value) parsed again.
      source = next((a.split('=', 1)[1] for a in argv[1:] if re.match(rf'--?{name}=', a)), None)
      if source is None:
        i = next((i for i, a in enumerate(argv[1:-1], 1) if re.fullmatch(rf'--?{name}', a)), None)
        source = argv[i + 1] if i is not None else None
      try:
        node = flags.FLAGS[name].parser.parse(source) if source is not None else None
      except Exception:  # noqa: BLE001 - a config that does not load: absl's message says why.
        return None
      if node is None:
        continue
      for i, part in enumerate(path):
        where = '.'.join([name] + path[:i + 1])
        if not hasattr(node, 'keys'):
          return f'{".".join([name] + path[:i])} is a value ({node!r}), not a section'
        keys = list(node.keys())
        if part not in keys:
          if path[:i + 1] == ['model', 'moe']:
            return (f'{where} is not a key: this config is dense; MoE configs (e.g. '
                    'configs/tiny_moe.py) have a moe section')
          hint = closest_key(part, keys)
          return f'{where} is not a key; ' + (f'did you mean {hint}?' if hint else
                                             f'{where.rsplit(".", 1)[0]} has: {", ".join(keys)}')
        node = node[part]
    return None

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e} (--helpfull lists the flags)', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = unknown_key() or str(e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    print(f'error: bad config override: {msg}', file=sys.stderr)
    sys.exit(2)

"""Runs untrusted, model-written Python (a generated function plus its checks) for pass@k.

Nobody has read these programs, so none may hang, exhaust or reach outside the evaluation run:
each one gets a fresh `python -I -B` process (no user site, no PYTHON* variables, no .pyc
writes) in its own session and temporary directory, with a minimal environment, and

  * resource limits (address space, CPU seconds, file size, no core dumps), set by a prelude the
    child runs before the program, so an unbounded allocation is a MemoryError, not host OOM;
  * an audit hook (`sys.addaudithook`; it cannot be removed) that ends the process at once with
    BLOCKED_EXIT on sockets, process spawning, signalling, changing limits, ctypes, and writes
    outside its directory; exiting from inside the hook is deliberate: no `except`, `finally` or
    `os._exit(0)` in the candidate can turn a violation into a pass;
  * where unprivileged user namespaces work, `unshare --net`: no network at all (second layer);
  * a wall-clock timeout, after which the whole process group is SIGKILLed and reaped.

The audit hook is a guard against what generated code does, not a boundary against a program
written to escape it (e.g. re-creating a builtin module through `_imp`); a file count quota is
not enforced either (each file is capped by RLIMIT_FSIZE, the run by the timeout).

    run_program('def f(x):\n  return x + 1\nassert f(1) == 2\n').passed  # True
    run_many([src_a, src_b], Limits(timeout_s=5))  # -> [Outcome, Outcome], in order
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

BLOCKED_EXIT = 3  # the audit hook stopped a forbidden action (the prelude's literal 3)
MEMORY_EXIT = 4  # MemoryError reached the prelude (its literal 4)
_MARK = 'sandbox: '  # the prelude's own lines start with this, so exit codes alone can't fake them
_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: any single file the program writes
_STATUS_TAIL = 512  # bytes read for classification even when output_bytes is smaller

# Run by the child before the program. argv: program, address space bytes, CPU seconds, file size
# bytes, output bytes kept. Limits are set here rather than in preexec_fn, which is unsafe in a
# threaded parent (run_many); soft == hard for AS/FSIZE/CORE so the program cannot raise them.
_PRELUDE = r'''
import io, os, resource, sys, traceback
import _posixsubprocess
path, memory, cpu, fsize, cap = sys.argv[1], *map(int, sys.argv[2:6])
for res, soft, hard in ((resource.RLIMIT_AS, memory, memory), (resource.RLIMIT_CPU, cpu, cpu + 1),
                        (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0)):
  resource.setrlimit(res, (soft, hard))

class Capped(io.RawIOBase):
  """stdout and stderr share `cap` bytes; the rest is dropped but reported written, so a flood
  costs neither disk nor a blocked writer."""
  left = cap
  def __init__(self, fd):
    self.fd = fd
  def writable(self):
    return True
  def write(self, b):
    if Capped.left > 0:
      keep = min(len(b), Capped.left)
      Capped.left -= keep
      os.write(self.fd, b[:keep])
      if Capped.left == 0:
        os.write(self.fd, b'\n[output truncated]\n')
    return len(b)

def stream(fd):
  return io.TextIOWrapper(io.BufferedWriter(Capped(fd)), encoding='utf-8',
                          errors='backslashreplace', line_buffering=True)
sys.stdout = sys.__stdout__ = stream(1)
sys.stderr = sys.__stderr__ = stream(2)

def report(line, code):
  for s in (sys.stdout, sys.stderr):
    try:
      s.flush()
    except BaseException:
      pass
  os.write(2, ('\nsandbox: ' + line + '\n').encode('utf-8', 'backslashreplace'))
  os._exit(code)

home = os.path.realpath(os.path.dirname(path))
DENY = ('socket.', 'ctypes.', 'subprocess.', 'os.exec', 'os.spawn', 'os.posix_spawn', 'os.fork',
        'os.system', 'os.kill', 'signal.pthread_kill', 'resource.', 'urllib.Request',
        'webbrowser.', 'sys.remote_exec')
# `import ctypes` (numpy does) only opens the main program; loading libraries, looking up or
# calling foreign functions and reading raw memory stay blocked: they could bypass this hook.
CTYPES_OK = {'ctypes.addressof', 'ctypes.create_string_buffer', 'ctypes.create_unicode_buffer',
             'ctypes.get_errno', 'ctypes.set_errno'}
NO_IMPORT = {'_posixsubprocess'}  # a reload would undo the fork_exec stub below
WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# Path-changing events: (path argument, dir_fd argument or None), per the CPython audit table.
PATHS = {'os.remove': ((0, 1),), 'os.rmdir': ((0, 1),), 'os.rename': ((0, 2), (1, 3)),
         'os.link': ((0, 2), (1, 3)), 'os.symlink': ((1, 2),), 'os.truncate': ((0, None),),
         'os.chmod': ((0, 2),), 'os.chown': ((0, 3),), 'os.utime': ((0, 3),),
         'os.mkdir': ((0, 2),), 'shutil.rmtree': ((0, 1),)}

def outside(p, dir_fd=None):
  if isinstance(p, int):
    p = os.readlink(f'/proc/self/fd/{p}')
  base = os.readlink(f'/proc/self/fd/{dir_fd}') if isinstance(dir_fd, int) and dir_fd >= 0 \
      else os.getcwd()
  p = os.path.realpath(os.path.join(base, os.fsdecode(p)))
  return p != os.devnull and p != home and not p.startswith(home + os.sep)

def escapes(event, args):
  if event == 'open':  # an int is an fd already open (e.g. open(1, 'w')): nothing new is reached
    return bool(args[2] & WRITE) and not isinstance(args[0], int) and outside(args[0])
  return any(outside(args[i], None if j is None else args[j]) for i, j in PATHS.get(event, ()))

def hook(event, args):
  if event in CTYPES_OK or event == 'ctypes.dlopen' and args[0] is None:
    return
  if event.startswith(DENY) or (event == 'import' and args[0] in NO_IMPORT) \
      or (event == 'open' or event in PATHS) and escapes(event, args):
    report(f'blocked {event} {args!r:.300}', 3)

def fork_exec(*args):  # subprocess audits Popen first; this catches direct calls
  report('blocked _posixsubprocess.fork_exec', 3)
_posixsubprocess.fork_exec = fork_exec

with open(path, encoding='utf-8') as f:
  source = f.read()
sys.argv = [path]
sys.addaudithook(hook)
try:
  exec(compile(source, path, 'exec'), {'__name__': '__main__', '__file__': path,
                                      '__builtins__': __builtins__})
  code = 0
except MemoryError:
  report('MemoryError (address space limit)', 4)
except SystemExit as e:
  code = 0 if e.code in (None, 0) else 1
  if not isinstance(e.code, (int, type(None))):
    print(e.code, file=sys.stderr)
except BaseException as e:
  text = ''.join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
  sys.stdout.flush()
  os.write(2, text.encode('utf-8', 'backslashreplace')[-65536:])
  code = 1
for s in (sys.stdout, sys.stderr):
  s.flush()
os._exit(code)
'''


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. `output_bytes` of stdout+stderr are kept (the rest is dropped in the
  child, never buffered); the sandbox's own last lines always fit."""
  timeout_s: float = 10.0  # wall clock per program
  memory_mb: int = 512  # address-space limit (RLIMIT_AS)
  output_bytes: int = 16_000  # stdout/stderr kept

  def __post_init__(self):
    if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s)
            and self.timeout_s > 0):
      raise ValueError(f'timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}')
    if not isinstance(self.memory_mb, int) or self.memory_mb < 32:
      # Below ~32 MB the interpreter itself cannot start.
      raise ValueError(f'memory_mb must be an int >= 32, got {self.memory_mb!r}')
    if not isinstance(self.output_bytes, int) or self.output_bytes < 0:
      raise ValueError(f'output_bytes must be an int >= 0, got {self.output_bytes!r}')


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How one program ended: status is 'passed' | 'failed' | 'timeout' | 'memory' | 'blocked';
  `detail` is why it was stopped plus the tail of its output, for the per-example record."""
  status: str
  detail: str
  seconds: float

  @property
  def passed(self) -> bool:
    return self.status == 'passed'


@functools.cache
def _unshare() -> str | None:
  """The `unshare` binary if it can give a child its own (empty) network namespace without
  privileges here, else None; checked once per process."""
  exe = shutil.which('unshare')
  try:
    ok = exe is not None and subprocess.run(
        [exe, '--net', '--map-root-user', 'true'], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
  except (OSError, subprocess.SubprocessError):
    ok = False
  return exe if ok else None


def network_namespace_available() -> bool:
  """Whether programs run without any network interface (the layer under the audit hook)."""
  return _unshare() is not None


def _classify(rc: int, timed_out: bool, tail: str, limits: Limits) -> tuple[str, str]:
  if timed_out:
    return 'timeout', f'sandbox: killed after {limits.timeout_s:g} s of wall clock'
  if rc == BLOCKED_EXIT and _MARK + 'blocked' in tail:
    return 'blocked', ''
  if rc == MEMORY_EXIT and _MARK + 'MemoryError' in tail:
    return 'memory', ''
  if rc == 0:
    return 'passed', ''
  if rc == -signal.SIGXCPU:
    return 'timeout', 'sandbox: CPU time limit (SIGXCPU)'
  if rc == -signal.SIGKILL:  # not ours (we did not time out): the kernel's OOM killer
    return 'memory', 'sandbox: killed by SIGKILL, most likely out of memory'
  if rc < 0:
    return 'failed', f'sandbox: killed by {signal.Signals(-rc).name}'
  return 'failed', ''


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
  """Runs one program (as `__main__`) in a fresh sandboxed interpreter; never raises for
  anything the program does, and returns within about `limits.timeout_s`."""
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix='sandbox-', ignore_cleanup_errors=True) as home, \
      tempfile.TemporaryFile() as out:
    path = os.path.join(home, 'program.py')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(source)
    argv = [sys.executable, '-I', '-B', '-c', _PRELUDE, path, str(limits.memory_mb << 20),
            str(math.ceil(limits.timeout_s) + 1), str(_FILE_BYTES), str(limits.output_bytes)]
    if _unshare() is not None:
      argv = [_unshare(), '--net', '--map-root-user', *argv]  # execs python: same pid and group
    env = {'PATH': os.environ.get('PATH', os.defpath), 'HOME': home, 'TMPDIR': home,
           'LANG': 'C.UTF-8'}
    # Output goes to an unnamed file, not a pipe: a flood cannot block the child or the parent.
    proc = subprocess.Popen(argv, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
      proc.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
    finally:
      try:  # the whole group: also whatever the program left behind in its session
        os.killpg(proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass  # already gone
      proc.wait()
    size = out.seek(0, os.SEEK_END)
    keep = max(limits.output_bytes, _STATUS_TAIL)
    out.seek(max(0, size - keep))
    raw = out.read(keep)
  tail = raw.decode('utf-8', 'replace')
  status, why = _classify(proc.returncode, timed_out, tail, limits)
  tail = raw[max(0, len(raw) - limits.output_bytes):].decode('utf-8', 'replace').strip()
  detail = '\n'.join(s for s in (why, tail) if s)
  return Outcome(status, detail, time.monotonic() - start)


def run_many(sources: Sequence[str], limits: Limits = Limits(),
             workers: int = 2) -> list[Outcome]:
  """run_program over `sources` on `workers` threads (each waits on its own subprocess);
  outcomes come back in the order of `sources`."""
  if workers < 1:
    raise ValueError(f'workers must be >= 1, got {workers}')
  if not sources:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(workers, len(sources))) as pool:
    return list(pool.map(lambda s: run_program(s, limits), sources))

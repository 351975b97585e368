"""One writer per workdir: an exclusive `fcntl.flock` on `WORKDIR/lock`, which holds the holder's
host, pid and start time.

The kernel drops a flock when its process dies (SIGKILL included), so a lock file left behind by a
dead trainer is stale and is simply taken over. The file is unlinked on release, so a workdir that
is not being trained has no lock file, and a run refused before it trains leaves the tree as it
found it. Readers (`launch.sample`, evaluation) never take the lock.

Object stores have no flock: a workdir on `gs://` is not locked (documented in the README); keep
one trainer per run there, as the TPU launcher does.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

LOCK_NAME = 'lock'


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir, log):` holds the lock for the block (process 0 of a job only)."""

  def __init__(self, workdir: str, log=print):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._log = log
    self._fd: int | None = None

  def acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _describe(os.read(fd, 4096))
        os.close(fd)
        raise WorkdirLockedError(
            f'workdir {os.path.dirname(self.path)} is in use by {holder}; wait for it to finish, '
            'stop it, or use another --workdir') from None
      # The holder we waited on may have unlinked the file before we locked it: then our lock is
      # on a dead inode and the next process would lock a new file. Retry on the live one.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    stale = os.read(fd, 4096)
    if stale.strip():
      self._log(f'Taking over a stale lock from {_describe(stale)}, which is no longer running')
    record = {'host': socket.gethostname(), 'pid': os.getpid(),
              'since': datetime.datetime.now().isoformat(timespec='seconds')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)   # Before unlocking, so nobody locks a file that is going away.
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _describe(raw: bytes) -> str:
  try:
    h = json.loads(raw.decode())
    return f'pid {h["pid"]} on host {h["host"]} (since {h["since"]})'
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    return 'another process'

"""Every workdir read and write in palmax goes through here, so a workdir may be a local directory
or an object-store prefix (`gs://bucket/run`, `s3://...`) alike.

Paths are strings; `etils.epath` (which orbax uses too) does the work for object stores, plain `os`
for local paths. Writes are all-or-nothing on both: a local file is written to a temporary name
and renamed into place; an object is replaced whole by one upload, which object stores already
make atomic. Object stores have no append and no rename: `append_text` rewrites the object, and
`move` copies then deletes (only corrupt checkpoints are moved).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
from typing import Any, Iterator

import numpy as np

REMOTE_PREFIXES = ('gs://', 's3://', 'az://')


def is_remote(path: str) -> bool:
  return str(path).startswith(REMOTE_PREFIXES)


def _epath(path: str):
  from etils import epath   # Imported on first remote use: local runs never need it.
  return epath.Path(path)


def join(*parts: str) -> str:
  if is_remote(parts[0]):
    return posixpath.join(*(str(p) for p in parts))
  return os.path.join(*parts)


def absolute(path: str) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


def dirname(path: str) -> str:
  return posixpath.dirname(str(path).rstrip('/')) if is_remote(path) else os.path.dirname(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def walk_files(root: str) -> Iterator[str]:
  """Paths of every file under `root`, relative to it with '/' separators, in sorted order."""
  if is_remote(root):
    base = str(root).rstrip('/')
    key = base.split('://', 1)[1]   # fsspec stores name walked directories without the scheme.
    found = []
    for d, _, files in _epath(base).walk():
      d = str(d)
      sub = d[d.find(key) + len(key):].strip('/')
      found += [posixpath.join(sub, f) if sub else f for f in files]
    yield from sorted(found)
    return
  for d, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      yield os.path.relpath(os.path.join(d, name), root).replace(os.sep, '/')


def size(path: str) -> int:
  return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def open_read(path: str, mode: str = 'rb'):
  return _epath(path).open(mode) if is_remote(path) else open(path, mode)


def read_bytes(path: str) -> bytes:
  with open_read(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def read_json(path: str, default: Any = None) -> Any:
  """The JSON value in `path`, or `default` when it is missing or not JSON (a cache key file
  cut short by a kill reads as absent)."""
  try:
    return json.loads(read_bytes(path))
  except (OSError, ValueError):
    return default


def read_jsonl(path: str, what: str = 'data file') -> list[tuple[Any, str]]:
  """(object, 'path:line') for each non-blank line of a JSON Lines file; a line that is not
  JSON is refused naming the file and line."""
  if not exists(path):
    raise FileNotFoundError(f'{what} {path} not found')
  out = []
  for n, line in enumerate(read_text(path).splitlines(), 1):
    if line.strip():
      try:
        out.append((json.loads(line), f'{path}:{n}'))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{n}: not JSON ({e.msg})') from None
  return out


def write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
  """Replaces `path` with `data` all at once: readers see the old file or the new one."""
  if is_remote(path):
    with _epath(path).open('wb') as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
    if fsync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str, value: Any, fsync: bool = False) -> None:
  write_bytes(path, json.dumps(value, indent=1).encode('utf-8'), fsync=fsync)


def append_text(path: str, text: str) -> None:
  """Appends to a local file; rewrites the object on a store that cannot append."""
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b''
    write_bytes(path, old + text.encode('utf-8'))
    return
  with open(path, 'a', encoding='utf-8') as f:
    f.write(text)


def remove(path: str) -> None:
  """Deletes a file if it is there."""
  if is_remote(path):
    p = _epath(path)
    if p.exists():
      p.unlink()
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path: str) -> None:
  if is_remote(path):
    p = _epath(path)
    if p.exists():
      p.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def move(src: str, dst: str) -> None:
  """Renames a file or directory (copy, then delete, on an object store)."""
  if not is_remote(src):
    os.replace(src, dst)
    return
  for rel in list(walk_files(src)):
    write_bytes(join(dst, rel), read_bytes(join(src, rel)))
  rmtree(src)


def save_npy(path: str, array: np.ndarray) -> None:
  """Writes `array` as .npy all at once (locally streamed to a temporary file, then renamed)."""
  if is_remote(path):
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes(path, buf.getvalue())
    return
  tmp = f'{path}.tmp{os.getpid()}.npy'
  np.save(tmp, array)
  os.replace(tmp, path)


def load_npy(path: str, mmap: bool = False) -> np.ndarray:
  """A .npy file; memory-mapped when local and asked for (the train token stream can be large)."""
  if mmap and not is_remote(path):
    return np.load(path, mmap_mode='r')
  return np.load(io.BytesIO(read_bytes(path)))

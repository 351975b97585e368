"""Checkpoint manifests: the size and sha256 of every file of a step, checked before it is read.

Orbax's atomic rename guarantees that a listed step was completely written; it says nothing about
what happened to the bytes afterwards (a flipped block, a truncated copy, a file deleted by hand).
A flipped block inside an array file restores silently and shows up steps later as a NaN loss. So
every save ends by writing `checkpoints/<step>/palmax_manifest.json`:

  {"format": "palmax-checkpoint-manifest", "version": 1, "step": 40, "algorithm": "sha256",
   "unhashed": ["_CHECKPOINT_METADATA", "commit_success.txt"],
   "files": {"record/metadata": {"size": 8, "sha256": "..."},
             "state/ocdbt.process_0/d/511911...": {"size": 805703, "sha256": "..."}, ...}}

`files` covers every file of the step except the manifest and the two top-level files in
`unhashed`: orbax rewrites those while committing the step (a commit timestamp and a success
marker), after the manifest is written, and neither holds tensor data. `verify_step` refuses a
step whose listed file is missing, has another size or digest, or whose item directories (state/,
record/) hold a file the manifest does not list. A step without a manifest (saved before this
file existed, or killed between its commit and its manifest) is "unverified", not refused.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import hashlib
import json
import os
import sys

from train import paths

MANIFEST = 'palmax_manifest.json'
FORMAT = 'palmax-checkpoint-manifest'
VERSION = 1
# Top-level orbax bookkeeping written during the commit, i.e. after the manifest (see above).
UNHASHED = ('_CHECKPOINT_METADATA', 'commit_success.txt')
_CHUNK = 8 << 20


class CheckpointCorruptError(ValueError):
  """A checkpoint step's files differ from its manifest, or the step could not be read.

  `step`, `directory` (the checkpoints/ directory) and `path` (the offending file relative to the
  step, or None) name the problem; `verified` is True when the files match the manifest but
  reading failed anyway (not corruption of the bytes: no fallback, nothing moved)."""

  def __init__(self, message: str, step: int, directory: str, path: str | None = None,
               verified: bool = False):
    super().__init__(message)
    self.step, self.directory, self.path, self.verified = step, directory, path, verified


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, read in chunks (checkpoint files can be many GB)."""
  h = hashlib.sha256()
  with paths.open_read(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)   # hashlib releases the GIL on large buffers: threads hash in parallel.
  return h.hexdigest()


def _step_files(step_dir: str) -> list[str]:
  return [rel for rel in paths.walk_files(step_dir)
          if rel != MANIFEST and rel not in UNHASHED and not rel.startswith(MANIFEST + '.')]


def _hash_all(step_dir: str, rels: list[str]) -> dict[str, str]:
  workers = max(1, min(8, os.cpu_count() or 1, len(rels)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    digests = pool.map(lambda r: sha256_file(paths.join(step_dir, r)), rels)
    return dict(zip(rels, digests))


def write_manifest(step_dir: str, step: int) -> dict:
  """Hashes every file of `step_dir` and writes its manifest atomically (temp file, fsync,
  rename), so a reader sees either no manifest or a complete one. Returns the manifest."""
  rels = _step_files(step_dir)
  digests = _hash_all(step_dir, rels)
  manifest = {'format': FORMAT, 'version': VERSION, 'step': int(step), 'algorithm': 'sha256',
              'unhashed': list(UNHASHED),
              'files': {r: {'size': paths.size(paths.join(step_dir, r)),
                            'sha256': digests[r]} for r in rels}}
  paths.write_bytes(paths.join(step_dir, MANIFEST),
                    json.dumps(manifest, indent=1, sort_keys=True).encode(), fsync=True)
  return manifest


def _short(digest: str) -> str:
  return digest[:12] + '...'


def verify_step(root: str, step: int, prefix: str | None = None) -> bool:
  """Checks step `step` of the checkpoints directory `root` against its manifest.

  Returns True when every file matches, False when the step has no manifest (unverified); raises
  CheckpointCorruptError (one line naming the step, `root` and the file) otherwise. `prefix`
  (e.g. 'record/') checks only the files under it. Sizes and the file list are checked before
  any file is hashed, so a truncated or missing file is reported without reading gigabytes."""
  step_dir = paths.join(root, str(step))

  def corrupt(path: str | None, why: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f'checkpoint step {step} in {root} is corrupt: {why}',
                                  step, root, path)

  if not paths.isdir(step_dir):
    raise FileNotFoundError(f'no checkpoint step {step} in {root}')
  manifest_path = paths.join(step_dir, MANIFEST)
  if not paths.exists(manifest_path):
    return False
  try:
    manifest = json.loads(paths.read_bytes(manifest_path))
    version, files = manifest.get('version'), manifest.get('files')   # Not a dict: corrupt.
  except (OSError, ValueError, AttributeError) as e:
    raise corrupt(MANIFEST, f'its manifest {MANIFEST} is unreadable ({type(e).__name__}: '
                            f'{str(e).splitlines()[0] if str(e) else ""})') from None
  if manifest.get('format') == FORMAT and isinstance(version, int) and version > VERSION:
    raise ValueError(f'checkpoint step {step} in {root} has a {MANIFEST} of version {version}; '
                     f'this palmax reads version {VERSION}: use a newer palmax, or verify=False')
  if (manifest.get('format') != FORMAT or version != VERSION or not isinstance(files, dict)
      or not all(isinstance(v, dict) and isinstance(v.get('size'), int)
                 and isinstance(v.get('sha256'), str) for v in files.values())):
    raise corrupt(MANIFEST, f'its manifest {MANIFEST} is malformed')
  want = {r: v for r, v in files.items() if prefix is None or r.startswith(prefix)}
  for rel in sorted(want):
    full = paths.join(step_dir, rel)
    if not paths.isfile(full):
      raise corrupt(rel, f'{rel} is missing (it was deleted after the step was saved)')
    size, expected = paths.size(full), want[rel]['size']
    if size != expected:
      how = 'truncated' if size < expected else 'bytes were appended'
      raise corrupt(rel, f'{rel} has {size} bytes, expected {expected} ({how})')
  for rel in _step_files(step_dir):
    # Extra files inside an item directory (state/, record/) could be read as array data; extra
    # top-level files (e.g. markers a newer orbax writes at commit) are not part of the state.
    if '/' in rel and rel not in files and (prefix is None or rel.startswith(prefix)):
      raise corrupt(rel, f'{rel} is not in the manifest (a file was added after the step was '
                         'saved)')
  try:
    digests = _hash_all(step_dir, sorted(want))
  except OSError as e:   # E.g. another process moved the step away while it was being hashed.
    raise corrupt(getattr(e, 'filename', None), f'a file could not be read ({e})') from None
  for rel in sorted(want):
    if digests[rel] != want[rel]['sha256']:
      raise corrupt(rel, f'{rel} has sha256 {_short(digests[rel])}, expected '
                         f'{_short(want[rel]["sha256"])} (the file changed after it was saved)')
  if prefix is None:
    meta = paths.join(step_dir, '_CHECKPOINT_METADATA')
    if paths.exists(meta):   # Unhashed, but orbax parses it: at least it must be JSON.
      try:
        json.loads(paths.read_bytes(meta))
      except (OSError, ValueError) as e:
        raise corrupt('_CHECKPOINT_METADATA', f'_CHECKPOINT_METADATA is not valid JSON ({e})') \
            from None
  return True


def list_steps(root: str) -> list[int]:
  """Committed step numbers in a checkpoints directory (orbax's temporary directories, whose
  names carry a suffix, are not steps), ascending."""
  if not paths.isdir(root):
    return []
  return sorted(int(n) for n in paths.listdir(root)
                if n.isdigit() and paths.isdir(paths.join(root, n)))


def newest_verified(root: str, steps: list[int] | None = None, skip: int | None = None):
  """The newest step (of `steps`, default all in `root`, except `skip`) whose files match its
  manifest; unverified and corrupt steps are passed over. None when there is none."""
  for s in sorted(list_steps(root) if steps is None else steps, reverse=True):
    if s == skip:
      continue
    try:
      if verify_step(root, s):
        return s
    except (CheckpointCorruptError, FileNotFoundError):
      continue
  return None


def suggest_step(root: str, bad: int) -> str:
  """The end of a reader's refusal: which `--step=N` verifies, if any does."""
  good = newest_verified(root, skip=bad)
  if good is None:
    return 'no other step verifies'
  return f'step {good} is the newest that verifies: pass --step={good}'


def move_corrupt(root: str, step: int) -> str:
  """Moves step directory `step` out of `root` into `<workdir>/checkpoints_corrupt/` (kept for
  inspection; orbax never lists it again and the step number can be saved anew). Returns the
  new path."""
  dest_root = paths.join(paths.dirname(paths.absolute(root)), 'checkpoints_corrupt')
  paths.makedirs(dest_root)
  dest, n = paths.join(dest_root, str(step)), 1
  while paths.exists(dest):   # The same step number may have gone bad before.
    n += 1
    dest = paths.join(dest_root, f'{step}.{n}')
  paths.move(paths.join(root, str(step)), dest)
  return dest


def describe(err: BaseException) -> str:
  """One line for an orbax/tensorstore exception: the innermost cause (orbax wraps tensorstore's
  message in one carrying a multi-page spec), cut at 300 characters."""
  for _ in range(10):
    if err.__cause__ is None:
      break
    err = err.__cause__
  text = str(err).strip()
  text = text.split(' See full TensorStore details')[0].splitlines()[0] if text else ''
  text = f'{type(err).__name__}: {text}'
  return text if len(text) <= 300 else text[:300] + '...'


_hook_installed = False
_reads_in_flight = 0
_a_read_failed = False


def _orbax_read_noise(unraisable) -> bool:
  """The reports that a failed orbax read leaves behind: its abandoned read coroutines, which
  catch BaseException and so raise again when closed (GeneratorExit) at a later garbage
  collection, and tensorstore callbacks posting to orbax's closed event loop (while a read is in
  flight, or at any time after one failed: they can arrive after the read has returned)."""
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None and 'orbax' in code.co_filename:
    return isinstance(getattr(unraisable.exc_value, '__cause__', None), GeneratorExit)
  return ((_reads_in_flight > 0 or _a_read_failed)
          and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed')


@contextlib.contextmanager
def quiet_reads():
  """Around an orbax read: a failure is reported once, by the caller, in one line, not also as
  a dozen 'Exception ignored' tracebacks. Only the reports `_orbax_read_noise` matches are
  dropped (everything else reaches the previous `sys.unraisablehook`); collectable abandoned
  reads are collected on the way out of a failed read."""
  global _hook_installed, _reads_in_flight, _a_read_failed
  if not _hook_installed:
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _orbax_read_noise(unraisable):
        previous(unraisable)

    sys.unraisablehook = hook
    _hook_installed = True
  _reads_in_flight += 1
  try:
    yield
  except BaseException:
    _a_read_failed = True
    gc.collect()
    raise
  finally:
    _reads_in_flight -= 1


def read_error(root: str, step: int, err: BaseException) -> BaseException:
  """What an orbax/tensorstore exception raised while reading step `step` becomes: out-of-memory
  errors, and programming errors on a step that verifies, stay as they are; anything else a
  one-line CheckpointCorruptError, naming the bad file when the manifest finds one, marked
  `verified` when the files match the manifest (so the failure is not corruption of the bytes)."""
  text = describe(err)
  if isinstance(err, MemoryError) or 'RESOURCE_EXHAUSTED' in text:
    return err
  try:
    verified = verify_step(root, step)
  except CheckpointCorruptError as e:
    return e
  except (FileNotFoundError, ValueError):
    verified = False
  if verified and isinstance(err, (AttributeError, NameError, ImportError, AssertionError)):
    return err   # Intact bytes and a programming error: a bug to report with its traceback.
  if verified:
    return CheckpointCorruptError(
        f'checkpoint step {step} in {root} could not be read although its files match its '
        f'manifest (the train state this run builds may differ from the saved one): {text}',
        step, root, None, verified=True)
  return CheckpointCorruptError(
      f'checkpoint step {step} in {root} is corrupt: it could not be read and has no {MANIFEST} '
      f'to name the bad file ({text})', step, root, None)

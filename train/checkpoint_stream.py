"""Reading and writing palmax checkpoints piece by piece (conversion, fine-tuning init).

`save_streamed` writes a train-state checkpoint in exactly the layout `train/checkpoint.py`'s
Checkpointer reads (`checkpoints/<step>/{state,record}`, orbax OCDBT), but leaves may be
`StreamedLeaf`s: a shape, a dtype and a function returning blocks along one axis. Each block is
produced and written (tensorstore, chunk-aligned) before the next is made, one at a time, so a
7B-parameter state is written in a few hundred MB of memory. `LeafReader` is the inverse: blocks
of one stored leaf. `restore_params` restores only the parameters of a workdir's checkpoint (no
optimizer state), onto given shardings. Both readers check the step against its manifest
(`checkpoint_verify`) and refuse a corrupt one in one line; they never move or write anything.
"""
from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import type_handlers as th

from train import checkpoint_verify as cv, paths

BLOCK_BYTES = 64 << 20   # Target size of one written block and of one stored chunk.


class StreamedLeaf:
  """A leaf written block by block: `read(start, stop)` returns the block [start:stop] along
  `axis`, already in `dtype`. `name` is used in progress and error messages."""

  def __init__(self, shape, dtype, read: Callable[[int, int], np.ndarray], axis: int = 0,
               name: str = '', chunk_axes: tuple[int, ...] = ()):
    self.shape, self.dtype, self.read, self.axis = tuple(shape), np.dtype(dtype), read, axis
    self.name, self.chunk_axes = name, chunk_axes
    self.size, self.ndim = math.prod(self.shape), len(self.shape)


def zeros_leaf(shape, dtype, name: str = '') -> StreamedLeaf:
  """Zeros (e.g. fresh Adam moments), produced a block at a time; they compress to almost nothing."""
  def read(a, b):
    s = list(shape)
    s[0] = b - a
    return np.zeros(s, dtype)
  return StreamedLeaf(shape, dtype, read, 0, name, chunk_axes=(0,) if len(shape) > 2 else ())


class _StreamHandler(th.NumpyHandler):
  """NumpyHandler that also writes StreamedLeafs, one block at a time across all leaves. Stored
  leaves are ordinary 'np.ndarray' leaves: any orbax restore reads them."""

  def __init__(self, log: Callable[[str], None] | None):
    super().__init__(deepcopy_host_arrays=False)
    self.log = log
    self.error: BaseException | None = None
    self._lock: asyncio.Lock | None = None

  async def _open_and_write(self, value, tspec, ts_context):
    if not isinstance(value, StreamedLeaf):
      return await super()._open_and_write(value, tspec, ts_context)
    if self._lock is None:
      self._lock = asyncio.Lock()
    t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    n = value.shape[value.axis]
    chunk = t.chunk_layout.write_chunk.shape[value.axis] or n
    per = max(1, value.size // max(n, 1)) * value.dtype.itemsize
    step = max(chunk, BLOCK_BYTES // max(per, 1) // chunk * chunk)
    for start in range(0, n, step):
      stop = min(n, start + step)
      async with self._lock:   # One block in memory at a time, whatever orbax runs concurrently.
        if self.error is not None:
          return
        try:
          block = np.asarray(value.read(start, stop), dtype=value.dtype)
          want = list(value.shape)
          want[value.axis] = stop - start
          if tuple(block.shape) != tuple(want):
            raise ValueError(f'{value.name}: block [{start}:{stop}] has shape {block.shape}, '
                             f'expected {tuple(want)}')
        except BaseException as e:   # Reported by save_streamed, not lost in orbax's futures.
          self.error = e
          return
        idx = tuple(slice(start, stop) if a == value.axis else slice(None)
                    for a in range(value.ndim))
        await t[idx].write(block)
        del block
    if self.log and value.name:
      self.log(f'  wrote {value.name} {list(value.shape)} {value.dtype}')


def _registry(handler: _StreamHandler):
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
      (jax.Array, th.ArrayHandler()), (str, th.StringHandler()), (StreamedLeaf, handler))


def save_streamed(workdir: str, step: int, state: Any, record: dict,
                  log: Callable[[str], None] | None = None) -> None:
  """Writes `state` (a pytree of numpy arrays and StreamedLeafs) and `record` as checkpoint
  `step` of `workdir`, synchronously. Errors raised while producing a block are re-raised here."""
  handler = _StreamHandler(log)

  def save_args(x):
    if isinstance(x, StreamedLeaf):
      return ocp.SaveArgs(chunk_byte_size=BLOCK_BYTES, shard_axes=x.chunk_axes)
    return ocp.SaveArgs()

  manager = ocp.CheckpointManager(
      paths.join(paths.absolute(workdir), 'checkpoints'),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(handler)),
                     'record': ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state, save_args=jax.tree.map(save_args, state)),
        record=ocp.args.JsonSave(record)), force=True)
    manager.wait_until_finished()
  except BaseException:
    if handler.error is not None:
      raise handler.error from None
    raise
  finally:
    manager.close()
  if handler.error is not None:
    raise handler.error
  if jax.process_index() == 0:   # Committed: now its manifest (a kill before leaves it unverified).
    cv.write_manifest(paths.join(paths.absolute(workdir), 'checkpoints', str(step)), step)


def check_step(root: str, step: int, verify: bool = True) -> None:
  """Refuses (CheckpointCorruptError, one line) a step of checkpoints directory `root` whose files
  differ from its manifest, naming the step that would verify. A step without a manifest passes."""
  if not verify:
    return
  try:
    cv.verify_step(root, step)
  except cv.CheckpointCorruptError as e:
    raise cv.CheckpointCorruptError(f'{e}; {cv.suggest_step(root, step)}', e.step, e.directory,
                                    e.path) from None


def _read_failed(root: str, step: int, err: BaseException) -> BaseException:
  """A reader's one-line error for an orbax/tensorstore failure (see `cv.read_error`)."""
  out = cv.read_error(root, step, err)
  if isinstance(out, cv.CheckpointCorruptError) and not out.verified:
    out = cv.CheckpointCorruptError(f'{out}; {cv.suggest_step(root, step)}', out.step,
                                    out.directory, out.path)
  return out


class LeafReader:
  """Blocks of the leaves stored in `workdir`'s checkpoint `step` (default: the latest), checked
  against the step's manifest first unless `verify=False` (which skips reading every byte)."""

  def __init__(self, workdir: str, step: int | None = None, verify: bool = True):
    root = epath.Path(paths.absolute(workdir)) / 'checkpoints'
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {root}')
    if step is None:
      step = steps[-1]
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint step {step} in {root} (have {steps})')
    self.step, self._root = step, str(root)
    check_step(self._root, step, verify)
    self.directory = root / str(step) / 'state'
    try:
      meta = json.loads((self.directory / '_METADATA').read_bytes())
      self.record = json.loads((root / str(step) / 'record' / 'metadata').read_bytes())
    except (OSError, ValueError) as e:
      raise _read_failed(self._root, step, e) from None
    self._zarr3 = bool(meta.get('use_zarr3'))
    self._ocdbt = bool(meta.get('use_ocdbt', True))
    self._ctx = th.get_ts_context(use_ocdbt=self._ocdbt)
    self._open: dict[str, Any] = {}

  def _store(self, path: tuple[str, ...]):
    name = '.'.join(path)
    if name not in self._open:
      info = th.ParamInfo(name=name, parent_dir=self.directory, use_zarr3=self._zarr3,
                          is_ocdbt_checkpoint=self._ocdbt, ts_context=self._ctx)
      spec = th.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
      try:
        self._open[name] = ts.open(spec, open=True, read=True, context=self._ctx).result()
      except ValueError as e:
        raise ValueError(f'checkpoint {self.directory} has no leaf {name!r} ({e})') from None
    return self._open[name]

  def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(self._store(path).shape)

  def dtype(self, path: tuple[str, ...]) -> np.dtype:
    return np.dtype(self._store(path).dtype.numpy_dtype)

  def read(self, path: tuple[str, ...], start: int, stop: int, axis: int = 0) -> np.ndarray:
    t = self._store(path)
    idx = tuple(slice(start, stop) if a == axis else slice(None) for a in range(t.rank))
    try:
      return np.asarray(t[idx].read().result())
    except Exception as e:  # pylint: disable=broad-except
      err = _read_failed(self._root, self.step, e)
    raise err


def restore_params(workdir: str, abstract_params: Any, step: int | None = None,
                   verify: bool = True) -> tuple[Any, dict]:
  """(params, record) from `workdir`'s checkpoint (latest or `step`), reading only the parameters
  onto `abstract_params` (ShapeDtypeStructs with shardings); the optimizer state is not read.
  The step is checked against its manifest first (the whole step is hashed: OCDBT interleaves
  parameters and moments in the same files); `verify=False` skips that for huge checkpoints.
  A corrupt or unreadable step raises CheckpointCorruptError in one line."""
  root = paths.join(paths.absolute(workdir), 'checkpoints')
  manager = ocp.CheckpointManager(
      root, item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                           'record': ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {root}')
    if step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint step {step} in {root} '
                              f'(have {sorted(manager.all_steps())})')
    check_step(root, step, verify)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    try:
      with cv.quiet_reads():
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={'params': abstract_params},
                                         restore_args={'params': restore_args},
                                         partial_restore=True),
            record=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      err = _read_failed(root, step, e)
      if err is e:
        raise
      raise err from e
  finally:
    manager.close()
  return out['state']['params'], dict(out['record'])


def read_record(workdir: str, step: int | None = None) -> dict:
  """The JSON record of `workdir`'s checkpoint (latest or `step`) without touching tensors (and
  without verifying them)."""
  return LeafReader(workdir, step, verify=False).record


def check_model(record: dict, model_cfg, where: str, architecture_only: bool = False) -> None:
  """Raises CheckpointMismatchError naming the first field where the checkpoint `record`'s model
  differs from `model_cfg`. `architecture_only` ignores run-time fields (dtype, remat,
  max_seq_len, MoE dispatch and loss coefficients), which fine-tuning may change."""
  from model.config import HOW_NOT_WHAT
  from model.hf import MOE_RUNTIME_FIELDS, RUNTIME_FIELDS
  from train.checkpoint import CheckpointMismatchError
  have, want = dict(record.get('model') or {}), model_cfg.to_dict()
  skip = set(RUNTIME_FIELDS) | {'max_seq_len'} if architecture_only else set()
  for key in sorted(set(have) | set(want)):
    a, b = have.get(key), want.get(key)
    if key in skip or key not in have or key in HOW_NOT_WHAT:
      continue   # Skipped, added to palmax after the checkpoint, or how (not what) it computes.
    if key == 'moe' and architecture_only and isinstance(a, dict) and isinstance(b, dict):
      a = {k: v for k, v in a.items() if k not in MOE_RUNTIME_FIELDS}
      b = {k: v for k, v in b.items() if k not in MOE_RUNTIME_FIELDS}
    if a != b:
      raise CheckpointMismatchError(
          f'{where} holds a model with model.{key}={a!r}, but this run has model.{key}={b!r}')


def init_params(workdir: str, model_cfg, abstract_params: Any) -> tuple[Any, int]:
  """(params, step) of `workdir`'s latest checkpoint for `config.train.init_from`. Its model must
  have the same architecture as `model_cfg` (see `check_model`)."""
  if not paths.isdir(paths.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'config.train.init_from={workdir!r} holds no checkpoints/ directory')
  reader = LeafReader(workdir)
  check_model(reader.record, model_cfg, f'config.train.init_from={workdir!r} '
              '(start from its config: --config=configs/finetune.py:WORKDIR)', architecture_only=True)
  params, _ = restore_params(workdir, abstract_params, reader.step, verify=False)  # Just verified.
  return params, reader.step

"""Hugging Face checkpoint directories, read and written one tensor (or row block) at a time.

Reading: `model.safetensors`, sharded `model.safetensors.index.json`, `pytorch_model.bin` or
sharded `pytorch_model.bin.index.json`. Safetensors files are parsed here (an 8-byte header
length, a JSON header of dtype/shape/byte offsets, then the raw little-endian data), so a row
block is one `np.fromfile` of exactly its bytes: no mmap, nothing else resident. `.bin` files go
through `torch.load(mmap=True, weights_only=True)` (zip format, torch >= 2.1).

Writing: `write_safetensors` streams tensors into shards of at most `max_shard_size` bytes
(`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`, or one `model.safetensors`),
as `save_pretrained` lays them out. Each shard's header is written first from the planned shapes,
then the tensors' bytes as they arrive.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from model.hf_weights import normalise_key, to_numpy

_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
              'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
              'U16': np.uint16, 'U32': np.uint32, 'U64': np.uint64, 'BOOL': np.bool_,
              'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
WEIGHT_FILES = ('model.safetensors.index.json', 'model.safetensors', 'pytorch_model.bin.index.json',
                'pytorch_model.bin')


class HFCheckpoint:
  """Tensor source over a HF checkpoint directory: `in`, names(), shape, dtype, rows (see
  `model.hf_weights.DictSource` for the same interface in memory). Multimodal Gemma 3 names
  (model.language_model.*) are seen as the text model's (model.*)."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'--src {directory} is not a directory')
    found = next((f for f in WEIGHT_FILES if os.path.isfile(os.path.join(directory, f))), None)
    if found is None:
      raise FileNotFoundError(f'{directory} holds no HF weights (looked for {", ".join(WEIGHT_FILES)})')
    self.format = 'safetensors' if 'safetensors' in found else 'bin'
    if found.endswith('.index.json'):
      with open(os.path.join(directory, found)) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ValueError(f'{os.path.join(directory, found)} has no "weight_map"')
      files = sorted(set(weight_map.values()))
    else:
      files = [found]
    self._entries: dict[str, tuple] = {}   # name -> (file, dtype, shape, offset) / (file, None...)
    self._bins: dict[str, dict] = {}
    for file in files:
      path = os.path.join(directory, file)
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{found} lists {file}, which is missing from {directory}')
      if self.format == 'safetensors':
        self._read_header(path)
      else:
        for name, t in self._bin(path).items():
          self._entries[normalise_key(name)] = (path, None, tuple(t.shape), name)

  def _read_header(self, path: str) -> None:
    with open(path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f'{path} is not a safetensors file (too short)')
      (n,) = struct.unpack('<Q', head)
      if n > 100 << 20:
        raise ValueError(f'{path} is not a safetensors file (header length {n})')
      header = json.loads(f.read(n))
    base = 8 + n
    for name, e in header.items():
      if name == '__metadata__':
        continue
      if e['dtype'] not in _ST_DTYPES:
        raise ValueError(f'{path}: tensor {name!r} has dtype {e["dtype"]}, unknown to palmax')
      begin, end = e['data_offsets']
      dtype = np.dtype(_ST_DTYPES[e['dtype']])
      shape = tuple(e['shape'])
      if end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f'{path}: tensor {name!r} byte range does not match shape {shape}')
      self._entries[normalise_key(name)] = (path, dtype, shape, base + begin)

  def _bin(self, path: str) -> dict:
    if path not in self._bins:
      import torch
      try:
        self._bins[path] = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
      except RuntimeError as e:
        raise ValueError(f'{path}: cannot memory-map this .bin ({e}); re-save it with '
                         'torch >= 1.6 (zip format) or as safetensors') from None
    return self._bins[path]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][2]

  def dtype(self, name: str) -> np.dtype:
    path, dtype, _, key = self._entries[name]
    if dtype is None:
      return to_numpy(self._bin(path)[key].flatten()[:0]).dtype
    return dtype

  def rows(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """Rows [start:stop] of tensor `name` (the whole tensor by default), in its stored dtype."""
    path, dtype, shape, offset = self._entries[name]
    if dtype is None:
      t = self._bin(path)[offset]   # For .bin entries `offset` is the stored key.
      return np.array(to_numpy(t[start:stop] if t.ndim else t))
    if not shape:
      return np.fromfile(path, dtype, 1, offset=offset).reshape(())
    start, stop, _ = slice(start, stop).indices(shape[0])
    row = int(np.prod(shape[1:])) * dtype.itemsize
    n = max(0, stop - start)
    return np.fromfile(path, dtype, n * row // dtype.itemsize,
                       offset=offset + start * row).reshape((n,) + shape[1:])


def parse_size(s: str | int) -> int:
  """'5GB' (10^9), '500MB', '2GiB' (2^30), '100KB' or a byte count -> bytes."""
  if isinstance(s, int):
    return s
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*', str(s), re.IGNORECASE)
  if not m:
    raise ValueError(f'--max_shard_size={s!r}; expected e.g. 5GB, 500MB or a byte count')
  unit = (m.group(2) or 'B').upper()
  mult = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}[unit]
  return int(float(m.group(1)) * mult)


def plan_shards(tensors: list[tuple[str, tuple, np.dtype]], max_shard_size: int) -> list[list[int]]:
  """Indices of `tensors` per shard: in order, a new shard when the next would overflow."""
  shards: list[list[int]] = [[]]
  size = 0
  for i, (_, shape, dtype) in enumerate(tensors):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if shards[-1] and size + n > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(i)
    size += n
  return shards


def write_safetensors(directory: str, tensors: list[tuple[str, tuple, np.dtype]],
                      values: Iterable[tuple[str, Any]], max_shard_size: int,
                      cast: Callable[[str, np.ndarray], np.ndarray],
                      log: Callable[[str], None] | None = None) -> list[str]:
  """Writes `values` ((name, array or iterator of row blocks), in `tensors` order) as sharded
  safetensors with their index; `cast(name, block)` gives each block its planned dtype.
  Returns the files written."""
  shards = plan_shards(tensors, max_shard_size)
  n_shards = len(shards)
  names = ['model.safetensors'] if n_shards == 1 else [
      f'model-{k + 1:05d}-of-{n_shards:05d}.safetensors' for k in range(n_shards)]
  weight_map, total = {}, 0
  values = iter(values)
  for k, idx in enumerate(shards):
    header, offset = {}, 0
    for i in idx:
      name, shape, dtype = tensors[i]
      n = int(np.prod(shape)) * np.dtype(dtype).itemsize
      header[name] = {'dtype': _ST_NAMES[np.dtype(dtype)], 'shape': list(shape),
                      'data_offsets': [offset, offset + n]}
      offset += n
      weight_map[name] = names[k]
    total += offset
    header['__metadata__'] = {'format': 'pt'}
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)   # Data starts 8-byte aligned, as safetensors writes it.
    with open(os.path.join(directory, names[k]), 'wb') as f:
      f.write(struct.pack('<Q', len(blob)) + blob)
      for i in idx:
        name, shape, dtype = tensors[i]
        got_name, value = next(values)
        if got_name != name:
          raise RuntimeError(f'tensor order mismatch: planned {name!r}, got {got_name!r}')
        blocks = [value] if isinstance(value, np.ndarray) else value
        rows = 0
        for block in blocks:
          block = cast(name, np.asarray(block))
          if block.dtype != np.dtype(dtype) or tuple(block.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f'{name}: block {block.dtype}{list(block.shape)} does not fit the '
                             f'planned {np.dtype(dtype)}{list(shape)}')
          f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8))  # No copy.
          rows += block.shape[0] if block.ndim else 1
        if rows != (shape[0] if shape else 1):
          raise ValueError(f'{name}: wrote {rows} rows, expected {shape[0] if shape else 1}')
    if log:
      log(f'  wrote {names[k]} ({offset / 1e6:.1f} MB, {len(idx)} tensors)')
  if n_shards > 1:
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return names + (['model.safetensors.index.json'] if n_shards > 1 else [])

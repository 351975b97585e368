"""Text corpora for palmax: loading, normalization, dedupe and a stable train/val split.

Every source yields a list of `Document(name, text)`. `load_documents(data_cfg)` applies the same
pipeline to all of them:

    read → normalize → drop empty → dedupe → max_docs → split(val_fraction, seed)

and returns `(train_docs, val_docs, info)`. `info['fingerprint']` identifies exactly the documents
(and which split each one went to), so caches keyed by it are never stale.

Sources:
  'stdlib'  the default corpus, built offline from the running Python's standard library
            (`.py` sources, `test/` included) plus the English pydoc topics. Identical on
            machines with the same Python version.
  'text'    local UTF-8 text files, one document per file (`paths`: files or glob patterns).
  'jsonl'   local JSON-lines files, one document per line's `text_key`.
  'tfds'    an already-prepared TFDS dataset read as a random-access data source (no TensorFlow,
            no download).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import platform
import struct
import sysconfig
import unicodedata
from typing import Any, Iterable, Sequence

from model import config_rules

SOURCES = ('stdlib', 'text', 'jsonl', 'tfds')


@dataclasses.dataclass(frozen=True)
class Document:
  """One training document: a human-readable `name` (path, path:line, ...) and its `text`."""
  name: str
  text: str


# ----------------------------------------------------------------------------------------------------
# Normalization, dedupe, split.


def normalize(text: str) -> str:
  """NFC, `\\r\\n`/`\\r` → `\\n`, and no trailing whitespace at the end of the document.

  Everything else (indentation, tabs, blank lines inside the document) is kept: the corpus is code.
  """
  text = unicodedata.normalize('NFC', text)
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  return text.rstrip()


def _content_hash(text: str) -> bytes:
  return hashlib.sha256(text.encode('utf-8')).digest()


def dedupe(docs: Sequence[Document]) -> list[Document]:
  """Removes exact duplicates (by content hash), keeping the first occurrence and the order."""
  seen: set[bytes] = set()
  out = []
  for doc in docs:
    key = _content_hash(doc.text)
    if key not in seen:
      seen.add(key)
      out.append(doc)
  return out


def _val_score(text: str, seed: int) -> float:
  """A number in [0, 1) that depends only on the content and the seed."""
  digest = hashlib.sha256(f'palmax-split:{seed}:'.encode() + text.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def split(docs: Sequence[Document], val_fraction: float,
          seed: int) -> tuple[list[Document], list[Document]]:
  """Deterministic held-out split: a doc is validation iff hash(seed, content) < val_fraction.

  Membership depends only on each document's own content, so adding documents never moves existing
  ones between splits. When `val_fraction > 0` and no document falls under it, the document with
  the lowest score becomes the (single) validation document. Order within each split is kept.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'data.val_fraction must be in [0, 1), got {val_fraction!r}')
  if val_fraction == 0.0:
    return list(docs), []
  scores = [_val_score(d.text, seed) for d in docs]
  is_val = [s < val_fraction for s in scores]
  if not any(is_val) and docs:
    is_val[min(range(len(docs)), key=scores.__getitem__)] = True
  train = [d for d, v in zip(docs, is_val) if not v]
  val = [d for d, v in zip(docs, is_val) if v]
  if not train:
    raise ValueError(
        f'data.val_fraction={val_fraction} leaves no training documents '
        f'({len(docs)} document(s) in total); lower val_fraction or add data')
  return train, val


def fingerprint(train_docs: Sequence[Document], val_docs: Sequence[Document]) -> str:
  """sha256 hex over the ordered normalized texts of both splits (names are not included)."""
  h = hashlib.sha256(b'palmax-corpus-v1')
  for tag, docs in ((b'T', train_docs), (b'V', val_docs)):
    h.update(tag + struct.pack('<Q', len(docs)))
    for doc in docs:
      data = doc.text.encode('utf-8')
      h.update(struct.pack('<Q', len(data)) + data)  # length prefix: no ambiguity across docs
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Readers.


def _decode_utf8(data: bytes, where: str) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{where}: not valid UTF-8 at byte offset {e.start} '
                     f'(byte 0x{data[e.start]:02x}); expected UTF-8 text') from None


def _expand_paths(paths: str | Sequence[str], field: str = 'data.paths') -> list[str]:
  """Expands files and glob patterns (sorted per pattern); every entry must match something."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in (paths or [])]
  if not paths:
    raise ValueError(f'{field} is empty; expected a list of files or glob patterns')
  out = []
  for pattern in paths:
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise ValueError(f'{field}: glob pattern {pattern!r} matches no files')
      out.extend(matches)
    elif os.path.isdir(pattern):
      raise ValueError(f'{field}: {pattern!r} is a directory; expected a file or a glob pattern '
                       f'such as {os.path.join(pattern, "*.txt")!r}')
    elif not os.path.isfile(pattern):
      raise ValueError(f'{field}: file {pattern!r} does not exist')
    else:
      out.append(pattern)
  return out


def _read_nonempty(path: str) -> bytes:
  with open(path, 'rb') as f:
    data = f.read()
  if not data:
    raise ValueError(f'{path}: file is empty; expected text')
  return data


def text_documents(paths: str | Sequence[str]) -> list[Document]:
  """One document per local UTF-8 text file; `paths` are files or glob patterns."""
  return [Document(p, _decode_utf8(_read_nonempty(p), p)) for p in _expand_paths(paths)]


def jsonl_documents(paths: str | Sequence[str], text_key: str = 'text') -> list[Document]:
  """One document per non-blank line of local JSON-lines files, taken from field `text_key`."""
  docs = []
  for path in _expand_paths(paths):
    text = _decode_utf8(_read_nonempty(path), path)
    for lineno, line in enumerate(text.split('\n'), start=1):
      if not line.strip():
        continue  # blank lines (e.g. a trailing newline) carry no record
      where = f'{path}:{lineno}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None
      if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{where}: missing key {text_key!r} (data.text_key); found {keys}')
      value = record[text_key]
      if not isinstance(value, str):
        raise ValueError(f'{where}: field {text_key!r} must be a string, '
                         f'got {type(value).__name__}')
      docs.append(Document(where, value))
  return docs


def tfds_records(name: str, split: str = 'train', data_dir: str | None = None,
                 limit: int = 0) -> list[tuple[dict, str]]:
  """(record, 'name/split[i]') pairs of a prepared TFDS dataset via `tfds.data_source` (random
  access, no TensorFlow), text decoded: bytes become str, and a Sequence of dicts (TFDS gives
  {'role': [...], 'content': [...]}) becomes a list of dicts (chat `messages`).

  Nothing is downloaded: the dataset must already be prepared under `data_dir` (or the default TFDS
  directory). `limit > 0` reads only the first `limit` records.
  """
  import tensorflow_datasets as tfds  # Lazy: importing TFDS costs ~1-2 s.

  where = f'tfds dataset {name!r} (data.tfds_name), split {split!r}, data_dir {data_dir!r}'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises many types (not found, bad config, ...); report them uniformly.
    raise ValueError(f'cannot open {where}: {_first_line(e)}') from None
  if not builder.is_prepared():
    raise ValueError(f'{where}: not prepared in {builder.data_dir}; nothing is downloaded at run '
                     'time, so prepare it beforehand with '
                     'builder.download_and_prepare(file_format="array_record")')
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:
    raise ValueError(f'cannot read {where}: {_first_line(e)}') from None
  n = len(source) if not limit else min(limit, len(source))
  out = []
  for i in range(n):
    record = source[i]
    if not isinstance(record, dict):
      raise ValueError(f'{where}, record {i}: expected a dict of features, got '
                       f'{type(record).__name__}')
    out.append(({k: _plain(v, f'{where}, record {i}') for k, v in record.items()},
                f'{name}/{split}[{i}]'))
  return out


def _plain(value, where: str):
  """A TFDS feature value as JSON-like Python: str for text, lists, dicts; lists of dicts for a
  Sequence of dicts (a dict of equally long lists)."""
  if hasattr(value, 'tolist') and not isinstance(value, (bytes, str)):
    value = value.tolist()   # numpy scalars and arrays.
  if isinstance(value, bytes):
    return _decode_utf8(value, where)
  if isinstance(value, list):
    return [_plain(v, where) for v in value]
  if isinstance(value, dict):
    value = {k: _plain(v, where) for k, v in value.items()}
    lists = [v for v in value.values() if isinstance(v, list)]
    if value and len(lists) == len(value) and len({len(v) for v in lists}) == 1:
      return [dict(zip(value, row)) for row in zip(*value.values())]
  return value


def tfds_documents(name: str, split: str = 'train', text_key: str = 'text',
                   data_dir: str | None = None, limit: int = 0) -> list[Document]:
  """Documents (field `text_key`) from a prepared TFDS dataset; see `tfds_records`."""
  docs = []
  for i, (record, where) in enumerate(tfds_records(name, split, data_dir, limit)):
    where = (f'tfds dataset {name!r} (data.tfds_name), split {split!r}, data_dir {data_dir!r}, '
             f'record {i}')
    if text_key not in record:
      raise ValueError(f'{where}: missing key {text_key!r} (data.text_key); found '
                       f'{sorted(record)}')
    if not isinstance(record[text_key], str):
      raise ValueError(f'{where}: field {text_key!r} must be text, got '
                       f'{type(record[text_key]).__name__}')
    docs.append(Document(f'{name}/{split}[{i}]', record[text_key]))
  return docs


def _first_line(e: BaseException) -> str:
  """`Type: first line` of an exception (TFDS messages can list every known dataset)."""
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0] if lines else ""}'


def _stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def _is_stdlib_source(rel: pathlib.PurePath) -> bool:
  """Skips installed packages and the two build-machine-specific parts of the stdlib."""
  top = rel.parts[0]
  return not (top == 'site-packages' or top.startswith('config-') or
              top.startswith('_sysconfigdata_'))


def stdlib_documents() -> list[Document]:
  """The bundled default corpus: stdlib `.py` files (sorted relative paths) + pydoc topics.

  Files that are not valid UTF-8 (a few deliberately mis-encoded test fixtures) are skipped; the
  source info lists them (`skipped_not_utf8`). No network access, deterministic for a given
  Python version.
  """
  return _stdlib_documents_and_skipped()[0]


def _stdlib_documents_and_skipped() -> tuple[list[Document], list[str]]:
  root = _stdlib_root()
  rels = sorted(p.relative_to(root) for p in root.rglob('*.py') if p.is_file())
  docs, skipped = [], []
  for rel in rels:
    if not _is_stdlib_source(rel):
      continue
    data = (root / rel).read_bytes()
    try:
      docs.append(Document(rel.as_posix(), data.decode('utf-8')))
    except UnicodeDecodeError:
      skipped.append(rel.as_posix())
  from pydoc_data import topics  # English reference text shipped with every CPython.
  for key in sorted(topics.topics):
    docs.append(Document(f'pydoc_data.topics:{key}', topics.topics[key]))
  return docs, skipped


# ----------------------------------------------------------------------------------------------------
# The pipeline.


def _read_source(data_cfg: Any) -> tuple[list[Document], dict[str, Any]]:
  source = config_rules.field(data_cfg, 'source', 'stdlib')
  if source == 'stdlib':
    docs, skipped = _stdlib_documents_and_skipped()
    return docs, {'python_version': platform.python_version(), 'stdlib_path': str(_stdlib_root()),
                  'skipped_not_utf8': skipped}
  if source == 'text':
    paths = config_rules.field(data_cfg, 'paths')
    return text_documents(paths), {'paths': list(_as_list(paths))}
  if source == 'jsonl':
    paths = config_rules.field(data_cfg, 'paths')
    docs = jsonl_documents(paths, config_rules.field(data_cfg, 'text_key', 'text'))
    return docs, {'paths': list(_as_list(paths))}
  if source == 'tfds':
    name = config_rules.field(data_cfg, 'tfds_name')
    if not name:
      raise ValueError("data.tfds_name must be set when data.source == 'tfds'")
    split_name = config_rules.field(data_cfg, 'tfds_split', 'train') or 'train'
    docs = tfds_documents(name, split_name, config_rules.field(data_cfg, 'text_key', 'text'),
                          config_rules.field(data_cfg, 'tfds_data_dir') or None,
                          limit=int(config_rules.field(data_cfg, 'max_docs', 0) or 0))
    return docs, {'tfds_name': name, 'tfds_split': split_name}
  raise ValueError(f'data.source must be one of {list(SOURCES)}, got {source!r}')


def _as_list(paths: Any) -> Iterable[str]:
  if paths is None:
    return []
  return [paths] if isinstance(paths, str) else [str(p) for p in paths]


def describe_source(data_cfg: Any) -> str:
  source = config_rules.field(data_cfg, 'source', 'stdlib')
  if source in ('text', 'jsonl'):
    return f'data.source={source!r} paths={list(_as_list(config_rules.field(data_cfg, "paths")))}'
  if source == 'tfds':
    return f'data.source={source!r} tfds_name={config_rules.field(data_cfg, "tfds_name")!r}'
  return f'data.source={source!r}'


def load_documents(data_cfg: Any) -> tuple[list[Document], list[Document], dict[str, Any]]:
  """Reads `data_cfg.source` and returns `(train_docs, val_docs, info)`.

  Pipeline: normalize → drop empty → dedupe → first `max_docs` (0 = all) → split. `info` holds
  `source`, `fingerprint`, doc/byte counts per split (`*_docs`, `*_bytes`: UTF-8 bytes of the
  normalized texts), how many docs were dropped, and source details (python version for 'stdlib').
  """
  source = config_rules.field(data_cfg, 'source', 'stdlib')
  max_docs = int(config_rules.field(data_cfg, 'max_docs', 0) or 0)
  if max_docs < 0:
    raise ValueError(f'data.max_docs must be >= 0 (0 = all), got {max_docs}')
  val_fraction = float(config_rules.field(data_cfg, 'val_fraction', 0.0) or 0.0)
  seed = int(config_rules.field(data_cfg, 'seed', 0) or 0)
  raw, details = _read_source(data_cfg)

  normalized = [Document(d.name, normalize(d.text)) for d in raw]
  nonempty = [d for d in normalized if d.text]
  if not nonempty:
    raise ValueError(f'{describe_source(data_cfg)}: all {len(raw)} document(s) are empty after '
                     'normalization; expected some text')
  unique = dedupe(nonempty)
  kept = unique[:max_docs] if max_docs else unique
  train_docs, val_docs = split(kept, val_fraction, seed)

  info = {
      'source': source,
      'fingerprint': fingerprint(train_docs, val_docs),
      'read_docs': len(raw),
      'dropped_empty': len(raw) - len(nonempty),
      'dropped_duplicates': len(nonempty) - len(unique),
      'train_docs': len(train_docs),
      'val_docs': len(val_docs),
      'train_bytes': sum(len(d.text.encode('utf-8')) for d in train_docs),
      'val_bytes': sum(len(d.text.encode('utf-8')) for d in val_docs),
      'val_fraction': val_fraction,
      'seed': seed,
      'max_docs': max_docs,
      **details,
  }
  return train_docs, val_docs, info

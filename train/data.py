"""Token streams and batches for training and evaluation.

    build_data(cfg, workdir) → DataBundle(tokenizer, train Batches, val batches, info, ...)

Training: the train documents are tokenized, each followed by EOS, and concatenated into one int32
stream (`pack`). The stream is cut into non-overlapping windows of `seq_len + 1` tokens; a window is
one example (inputs `w[:-1]`, targets `w[1:]`). `Batches` visits the windows in a fresh permutation
per epoch drawn from `(seed, epoch)` and yields this process's rows of each global batch as
`np.int32 [B_local, seq_len + 1]`. Its position (`state()`: epoch and index, plus the seed and
window count as a check) is all a resumed run needs to see exactly the batches it would have seen.

Validation: the stream `[EOS] + pack(val_docs)` is cut into windows of `seq_len + 1` with stride
`seq_len` (consecutive windows share one token), so every val token — each document's text and the
EOS after it — is a target exactly once; padding has weight 0. Bits per byte:

    val_bytes_per_token = (UTF-8 bytes of the val docs + 1 per doc)
                          / (val tokens, including the EOS after each doc)
    bits_per_byte       = mean_val_loss_nats / ln(2) / val_bytes_per_token

The "+1 per doc" is the newline that stands for EOS in `validation_text()`, which is exactly the
byte string `launch/compressors.py` compresses, so the two figures compare like with like.

Token streams are cached as `WORKDIR/tokens_{train,val}.npy`, keyed by the corpus fingerprint and the
tokenizer's sha256 (`WORKDIR/tokens.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from model import config_rules
from train import corpus, failpoints, paths
from train import tokenizer as tokenizer_lib


def pack(token_lists: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
  """Concatenates the token lists, each followed by `eos_id`: int32 [sum(len + 1)]."""
  total = sum(len(t) + 1 for t in token_lists)
  out_N = np.empty(total, dtype=np.int32)
  pos = 0
  for ids in token_lists:
    out_N[pos:pos + len(ids)] = ids
    out_N[pos + len(ids)] = eos_id
    pos += len(ids) + 1
  return out_N


def validation_text(val_docs: Sequence[corpus.Document]) -> str:
  """The exact text bits-per-byte refers to: each val doc followed by one newline (its EOS)."""
  return ''.join(d.text + '\n' for d in val_docs)


def _shard_rows(global_batch_size: int, process_index: int, process_count: int,
                field: str) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f'{field}={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  per = global_batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


class Batches:
  """Deterministic, resumable iterator over training windows; see the module docstring.

  Examples are an endless sequence: epoch e lists all windows in permutation(seed, e); a global
  batch takes the next `global_batch_size` of them (crossing into the next epoch if needed, so no
  window is ever dropped). Every process computes the same global batch and keeps its rows.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, name: str = 'training data',
               extras: dict[str, np.ndarray] | None = None, make_fields=None):
    """`extras` (SFT's packed rows): streams aligned with `tokens` — 'loss' (the weight of
    predicting each token), 'segment_ids' and 'positions' (of each token as an input); then a
    batch is the dict of objective fields instead of the bare windows, made by
    `make_fields(tokens_BW, extras_BW)` (default `rows_fields`; preference units:
    train/preference_data.py)."""
    if seq_len < 1:
      raise ValueError(f'data.seq_len must be >= 1, got {seq_len}')
    self._rows = _shard_rows(global_batch_size, process_index, process_count, 'global_batch_size')
    self.window = seq_len + 1
    self.num_windows = len(tokens) // self.window
    if self.num_windows == 0:
      raise ValueError(f'{name}: {len(tokens)} tokens is fewer than one window of '
                       f'seq_len + 1 = {self.window} tokens; add data or lower data.seq_len')
    self._tokens_N = tokens
    self._extras = extras
    self._make_fields = make_fields or rows_fields
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.seed = seed
    self._epoch, self._index = 0, 0
    self._perm_epoch, self._perm = -1, None

  @property
  def steps_per_epoch(self) -> float:
    return self.num_windows / self.global_batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      self._perm_epoch = epoch
    return self._perm

  def _next_window_ids(self) -> np.ndarray:
    """The next global batch's window ids; advances the position."""
    ids, need = [], self.global_batch_size
    while need:
      perm = self._permutation(self._epoch)
      take = perm[self._index:self._index + need]
      ids.append(take)
      need -= len(take)
      self._index += len(take)
      if self._index == self.num_windows:
        self._epoch, self._index = self._epoch + 1, 0
    return np.concatenate(ids)

  def __iter__(self) -> 'Batches':
    return self

  def __next__(self) -> np.ndarray | dict[str, np.ndarray]:
    """int32 [global_batch_size / process_count, seq_len + 1]; with `extras`, the batch fields
    {'tokens', 'loss_mask' [B, T], 'segment_ids' [B, T], 'positions' [B, T]}."""
    window_ids_B = self._next_window_ids()[self._rows]
    offsets_BW = window_ids_B[:, None] * self.window + np.arange(self.window)[None, :]
    tokens_BW = np.asarray(self._tokens_N[offsets_BW], dtype=np.int32)
    if self._extras is None:
      return tokens_BW
    return self._make_fields(tokens_BW, {k: v[offsets_BW] for k, v in self._extras.items()})

  def state(self) -> dict[str, int]:
    """JSON-serialisable position: the next example is permutation(seed, epoch)[index]."""
    return {'epoch': int(self._epoch), 'index': int(self._index), 'seed': int(self.seed),
            'num_windows': int(self.num_windows)}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from `state()`; rejects a state taken on different data or a different seed."""
    try:
      epoch, index = int(state['epoch']), int(state['index'])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f'data state must have integer "epoch" and "index", got {state!r}') from None
    for key, mine in (('seed', self.seed), ('num_windows', self.num_windows)):
      if key in state and int(state[key]) != mine:
        raise ValueError(f'data state has {key}={state[key]} but this data has {key}={mine}: '
                         'the checkpoint was written with different data or data.seed')
    if epoch < 0 or not 0 <= index < self.num_windows:
      raise ValueError(f'data state epoch={epoch} index={index} out of range '
                       f'(index must be in [0, {self.num_windows}))')
    self._epoch, self._index = epoch, index


def validation_batches(val_tokens: np.ndarray, seq_len: int, batch_size: int,
                       max_batches: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """Fixed eval batches covering `val_tokens` as targets; see the module docstring.

  `val_tokens` is the packed val stream (docs each followed by EOS); an EOS is prepended so the
  first document is predicted from the same context as every other. Returns a list of
  `(tokens int32 [B, seq_len+1], weights float32 [B, seq_len])` full (global) batches: every
  process holds all rows. Weights are 1 on real targets and 0 on padding (pad id 0), so
  `sum(loss * weights) / sum(weights)` is the mean over the stream. `max_batches > 0` keeps only
  the first batches (then only a prefix of the stream is evaluated).
  """
  if seq_len < 1:
    raise ValueError(f'data.seq_len must be >= 1, got {seq_len}')
  if batch_size < 1:
    raise ValueError(f'eval batch_size must be >= 1, got {batch_size}')
  if len(val_tokens) == 0:
    raise ValueError('validation tokens are empty: data.val_fraction must be > 0 for evaluation')
  stream_N = np.concatenate([[tokenizer_lib.EOS_ID], np.asarray(val_tokens)]).astype(np.int32)
  num_targets = len(stream_N) - 1
  num_windows = math.ceil(num_targets / seq_len)
  num_batches = math.ceil(num_windows / batch_size)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  # Window w covers stream[w*T : w*T + T + 1]; rows past the stream are all padding.
  rows = num_batches * batch_size
  padded_N = np.zeros(rows * seq_len + 1, dtype=np.int32)
  n = min(len(stream_N), len(padded_N))
  padded_N[:n] = stream_N[:n]
  starts_R = np.arange(rows) * seq_len
  tokens_RW = padded_N[starts_R[:, None] + np.arange(seq_len + 1)[None, :]]
  target_pos_RT = starts_R[:, None] + np.arange(1, seq_len + 1)[None, :]
  weights_RT = (target_pos_RT <= num_targets).astype(np.float32)
  return [(tokens_RW[b * batch_size:(b + 1) * batch_size],
           weights_RT[b * batch_size:(b + 1) * batch_size]) for b in range(num_batches)]


def rows_fields(tokens_BW: np.ndarray, extras_BW: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Batch fields of row-aligned windows (`Batches` extras): targets' weights, inputs' segments."""
  return {'tokens': tokens_BW, 'loss_mask': np.asarray(extras_BW['loss'][:, 1:], np.float32),
          'segment_ids': np.asarray(extras_BW['segment_ids'][:, :-1], np.int32),
          'positions': np.asarray(extras_BW['positions'][:, :-1], np.int32)}


def document_ids(inputs_BT: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids [B, T], positions [B, T]) of packed input tokens. Documents are packed each
  followed by EOS, and that EOS is also what the next document is predicted from (a document
  alone is `[EOS] + doc + [EOS]`), so a segment starts at each EOS input and at the row's first
  token; segment ids count from 1 within the row, positions restart at 0 in each segment."""
  b, t = inputs_BT.shape
  starts_BT = inputs_BT == eos_id
  starts_BT[:, 0] = True
  segment_ids_BT = np.cumsum(starts_BT, axis=1).astype(np.int32)
  index_BT = np.broadcast_to(np.arange(t), (b, t))
  start_BT = np.maximum.accumulate(np.where(starts_BT, index_BT, 0), axis=1)
  return segment_ids_BT, (index_BT - start_BT).astype(np.int32)


def batch_fields(tokens_BW: np.ndarray, fields, eos_id: int,
                 loss_mask_BT: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The batch dict an objective asks for (train/objectives/base.py) from windows of the packed
  stream: tokens, and on request segment ids and positions (`document_ids`) and a loss mask
  (the given one, e.g. validation padding, else all ones)."""
  unknown = set(fields) - {'tokens', 'loss_mask', 'segment_ids', 'positions'}
  if unknown:
    raise ValueError(f'the objective asks for batch fields {sorted(unknown)} that packed text '
                     'data does not have')
  out = {'tokens': tokens_BW}
  if 'segment_ids' in fields or 'positions' in fields:
    out['segment_ids'], out['positions'] = document_ids(tokens_BW[:, :-1], eos_id)
  if loss_mask_BT is not None:
    out['loss_mask'] = loss_mask_BT
  elif 'loss_mask' in fields:
    out['loss_mask'] = np.ones((tokens_BW.shape[0], tokens_BW.shape[1] - 1), np.float32)
  return out


# ------------------------------------------------------------------------------------------------
# Tokenized-corpus cache and the bundle.


def tokenize_docs(tok: tokenizer_lib.Tokenizer, docs: Sequence[corpus.Document]) -> np.ndarray:
  """Packed int32 stream of `docs` (each followed by EOS), encoded in batches on all cores."""
  lists: list[list[int]] = []
  step = 512  # bounded memory for the per-doc Python lists on big corpora
  for i in range(0, len(docs), step):
    lists_i = tok.encode_batch([d.text for d in docs[i:i + step]])
    lists.append(pack(lists_i, tok.eos_id))
  return np.concatenate(lists) if lists else np.zeros(0, np.int32)


def cached_tokens(tok: tokenizer_lib.Tokenizer, train_docs: Sequence[corpus.Document],
                  val_docs: Sequence[corpus.Document], fingerprint: str, workdir: str | None
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Callable[[], None] | None]:
  """(train_tokens, val_tokens, meta, save): read from the workdir cache when its key (corpus
  fingerprint + tokenizer digest) matches, else tokenized here; `save()` writes the cache (None
  when it is current). Nothing is written here."""
  key = f'{fingerprint}:{tok.digest}'
  files = {s: paths.join(workdir, f'tokens_{s}.npy') for s in ('train', 'val')} if workdir else {}
  meta_path = paths.join(workdir, 'tokens.json') if workdir else None
  cached = paths.read_json(meta_path, {}) if meta_path else {}
  if isinstance(cached, dict) and cached.get('key') == key:
    try:
      return (paths.load_npy(files['train'], mmap=True), paths.load_npy(files['val']),
              dict(cached, cached=True), None)
    except (OSError, ValueError):
      pass  # unreadable cache: rebuild it
  start = time.time()
  train_N, val_N = tokenize_docs(tok, train_docs), tokenize_docs(tok, val_docs)
  meta = {'key': key, 'train_tokens': len(train_N), 'val_tokens': len(val_N),
          'tokenize_seconds': round(time.time() - start, 2)}
  if not workdir:
    return train_N, val_N, dict(meta, cached=False), None

  def save():
    # The key goes first and comes back last: a kill in between leaves no key, never a key
    # that names arrays which were only partly replaced.
    paths.remove(meta_path)
    for split_name, arr in (('train', train_N), ('val', val_N)):
      paths.save_npy(files[split_name], arr)
      failpoints.reach('tokens.write')
    paths.write_bytes(meta_path, json.dumps(meta, indent=1).encode())  # all at once
  return train_N, val_N, dict(meta, cached=False), save


@dataclasses.dataclass
class DataBundle:
  """Everything the trainer needs from the data side.

  `val_bytes_per_token` = (val UTF-8 bytes + val docs) / val tokens (EOS included);
  bits/byte = mean_val_loss_nats / ln 2 / val_bytes_per_token (exact when `val_coverage` == 1).
  """
  tokenizer: tokenizer_lib.Tokenizer
  train: Batches
  val: list[tuple[np.ndarray, np.ndarray]]  # (tokens [B, T+1], weights [B, T]), global batches
  info: dict[str, Any]
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  val_docs: list[corpus.Document]
  val_bytes_per_token: float
  val_coverage: float  # fraction of val targets present in `val` (1.0 unless max_batches cut it)

  def validation_text(self) -> str:
    return validation_text(self.val_docs)


def _global_batch_size(cfg: Any) -> int | None:
  value = config_rules.field(config_rules.field(cfg, 'train'), 'batch_size')
  return int(value) if value else None


def build_data(cfg: Any, workdir: str | None, process_index: int = 0, process_count: int = 1, *,
               global_batch_size: int | None = None, eval_batch_size: int | None = None,
               eval_max_batches: int | None = None, resume: dict | None = None,
               resume_from: str = 'the checkpoint') -> DataBundle:
  """Loads the corpus, gets the tokenizer, tokenizes (cached) and builds train/val batches.

  One pass with the checks first: the corpus is read; when `resume` (the JSON record of the
  checkpoint being resumed, described as `resume_from` in messages) is given, the corpus must be
  the one that checkpoint was trained on and the tokenizer the one it was trained with; the
  tokenizer and token cache are resolved and the batches built; only then, when everything
  fits, are the workdir's tokenizer and token-cache files written. A refused run writes nothing.

  `cfg` is the full config (uses `cfg.data` and, when `global_batch_size` is not given,
  `cfg.train.batch_size`) or just the data config. `eval_batch_size` defaults to the global
  batch size, `eval_max_batches` to `cfg.train.eval_batches` (0 = the whole val stream). Val
  batches are global (not sharded); `val_coverage` < 1 means `eval_max_batches` left part of the
  val stream out, and bits/byte from `val_bytes_per_token` is then an estimate.
  """
  field = config_rules.field
  data_cfg = field(cfg, 'data', None) if field(cfg, 'source') is None else cfg
  if data_cfg is None:
    raise ValueError('config has no data section (cfg.data)')
  global_batch_size = global_batch_size or _global_batch_size(cfg)
  if not global_batch_size:
    raise ValueError('global batch size unknown: pass global_batch_size= or set '
                     'cfg.train.batch_size')
  if eval_max_batches is None:
    eval_max_batches = int(field(field(cfg, 'train'), 'eval_batches', 0) or 0)
  seq_len = int(field(data_cfg, 'seq_len', 0) or 0)
  if seq_len < 1:
    raise ValueError(f'data.seq_len must be >= 1, got {seq_len}')

  train_docs, val_docs, info = corpus.load_documents(data_cfg)
  if resume is not None:
    _check_same_corpus(data_cfg, info, resume, resume_from)
    tok, save_tokenizer = _resumed_tokenizer(data_cfg, train_docs, workdir, resume, resume_from)
  else:
    tok, save_tokenizer = tokenizer_lib.resolve_tokenizer(data_cfg, train_docs, workdir)
  train_N, val_N, tmeta, save_tokens = cached_tokens(tok, train_docs, val_docs,
                                                     info['fingerprint'], workdir)
  info = dict(info, tokenizer_vocab_size=tok.vocab_size, tokenizer_sha256=tok.digest,
              train_tokens=int(len(train_N)), val_tokens=int(len(val_N)),
              tokens_cached=tmeta['cached'])

  seed = int(field(data_cfg, 'seed', 0) or 0)
  name = corpus.describe_source(data_cfg)
  train = Batches(train_N, seq_len, global_batch_size, seed, process_index, process_count,
                  name=f'{name} (training split)')
  val, val_bpt, coverage = [], float('nan'), 0.0
  if len(val_N):
    eval_bs = eval_batch_size or global_batch_size
    val = validation_batches(val_N, seq_len, eval_bs, eval_max_batches)
    val_bpt = (info['val_bytes'] + info['val_docs']) / len(val_N)
    coverage = min(len(val) * eval_bs * seq_len, len(val_N)) / len(val_N)
  info.update(val_bytes_per_token=val_bpt, val_coverage=coverage)
  if workdir:  # Everything fits: now the workdir may change.
    paths.makedirs(workdir)
    for save in (save_tokenizer, save_tokens):
      if save is not None:
        save()
  return DataBundle(tok, train, val, info, train_N, val_N, val_docs, val_bpt, coverage)


def _check_same_corpus(data_cfg, info: dict, record: dict, where: str) -> None:
  """Refuses a corpus other than the one `record`'s checkpoint was trained on, saying how the
  two differ (the stdlib corpus differs between Python versions)."""
  have = record.get('corpus_fingerprint')
  if have is None or have == info['fingerprint']:
    return
  then = record.get('corpus') or {}
  diffs = [f'fingerprint {have[:12]} then, {info["fingerprint"][:12]} now']
  for key in ('python_version', 'train_docs', 'val_docs', 'train_bytes', 'paths', 'tfds_name'):
    if key in then and then.get(key) != info.get(key):
      diffs.append(f'{key} {then.get(key)} then, {info.get(key)} now')
  from train.checkpoint import CheckpointMismatchError
  raise CheckpointMismatchError(
      f'the corpus ({corpus.describe_source(data_cfg)}) differs from the one {where} was trained on ({"; ".join(diffs)}); resume on the same '
      'data or use a new --workdir')


def _resumed_tokenizer(data_cfg, train_docs, workdir, record: dict, where: str):
  """The tokenizer `record`'s checkpoint was trained with: the workdir's own copy, or, if that is
  missing or differs, the config's tokenizer when it rebuilds exactly that one (then `save`
  restores the workdir's copy). Anything else is refused: sampling and training with another
  tokenizer would be silent garbage."""
  want = (record.get('corpus') or {}).get('tokenizer_sha256')
  found = None
  try:
    tok = tokenizer_lib.load_workdir_tokenizer(workdir)
    if want is None or tok.digest == want:
      return tok, None
    found = tok.digest
  except (OSError, ValueError):
    pass
  tok, save = tokenizer_lib.resolve_tokenizer(data_cfg, train_docs, workdir)
  if want is None or tok.digest == want:
    return tok, save
  from train.checkpoint import CheckpointMismatchError
  raise CheckpointMismatchError(
      f"the workdir's tokenizer ({'sha256 ' + found[:12] if found else 'missing'}) is not the one "
      f'{where} was trained with (sha256 {want[:12]}), and the config builds another '
      f'(sha256 {tok.digest[:12]}); restore {workdir}/tokenizer.model or use a new --workdir')


"""Lossless SentencePiece tokenizer with deliberate whitespace handling for code.

Ids: pad=0, eos=1, bos=2, unk=3 (the Gemma layout), then one control marker, 256 byte-fallback
pieces and the learned pieces. Byte fallback makes every string encodable.

Whitespace scheme ("palmax-ws-v1"), applied outside SentencePiece and inverted exactly by `decode`:
  * A newline plus the run of up to `MAX_INDENT` spaces after it becomes ONE private-use character
    U+E000+k (k = number of spaces). SentencePiece sees every line start as a single symbol that BPE
    can merge with what precedes/follows (`):` + newline + 8 spaces is one piece); without this,
    indentation costs several tokens per line and newlines fall back to bytes.
  * Pieces may span spaces (`split_by_whitespace=False`) and be whitespace only; no dummy prefix,
    no whitespace collapsing, identity normalization, digits split one per token (as in PaLM).
  * Literal occurrences of the reserved characters (U+2581 '▁', which SentencePiece uses for space,
    and U+E000..U+E000+MAX_INDENT) are encoded as their raw UTF-8 byte pieces, and `decode` maps those
    byte triples back to the literal characters, so `decode(encode(s)) == s` for every string.
    This is unambiguous because every reserved character is itself a vocabulary piece: ordinary
    text never reaches them through byte fallback.
Training feeds SentencePiece chunks of ~1000 characters cut just before line starts, so pieces can
cross line boundaries (SentencePiece otherwise trains line by line).

A SentencePiece model without the `<palmax-ws-v1>` marker (e.g. an external one) is used as is.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import sentencepiece as spm

from model import config_rules
from train import failpoints, paths

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
WS_MARKER = '<palmax-ws-v1>'
MAX_INDENT = 32          # newline + up to 32 spaces is one symbol; longer runs continue as spaces
_LINE_BASE = 0xE000      # U+E000 + k  ==  '\n' + k spaces
_SPACE_SYMBOL = '\u2581'  # SentencePiece's visible space
_CHUNK_CHARS = 1000      # training "sentence" size; whole documents trip unigram's seeding
_MAX_SENTENCE = 1 << 16  # hard cap on a training chunk (a single very long line is cut here)
MODEL_TYPES = ('bpe', 'unigram')


def _line_symbol(k: int) -> str:
  return chr(_LINE_BASE + k)


class Tokenizer:
  """A SentencePiece model plus the palmax whitespace scheme; see the module docstring."""

  def __init__(self, model_proto: bytes, where: str = '<memory>'):
    self._proto = bytes(model_proto)
    self.where = where
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text.
      raise ValueError(f'{where}: not a SentencePiece model ({type(e).__name__}: {e})') from None
    self._sp = sp
    if sp.pad_id() != PAD_ID:
      raise ValueError(f'{where}: pad id is {sp.pad_id()}; palmax expects pad_id == 0 '
                       '(padding and masks assume it)')
    for name, value in (('eos', sp.eos_id()), ('bos', sp.bos_id())):
      if value < 0:
        raise ValueError(f'{where}: the model defines no {name} piece; palmax needs eos and bos')
    self._ws = sp.piece_to_id(WS_MARKER) != sp.unk_id() and sp.is_control(sp.piece_to_id(WS_MARKER))
    self._max_indent = -1
    if self._ws:
      while (self._max_indent < MAX_INDENT and
             sp.piece_to_id(_line_symbol(self._max_indent + 1)) != sp.unk_id()):
        self._max_indent += 1
      if self._max_indent < 0:
        raise ValueError(f'{where}: has the {WS_MARKER} marker but no newline symbol U+E000')
    self._setup_escapes()

  # -- whitespace scheme ------------------------------------------------------------------------

  def _setup_escapes(self) -> None:
    """Reserved characters and the byte-piece sequences that stand for them literally."""
    sp = self._sp
    reserved = [_SPACE_SYMBOL] + [_line_symbol(k) for k in range(self._max_indent + 1)]
    has_bytes = sp.piece_to_id('<0xE2>') != sp.unk_id() and sp.is_byte(sp.piece_to_id('<0xE2>'))
    if not has_bytes or (not self._ws and sp.piece_to_id(_SPACE_SYMBOL) == sp.unk_id()):
      reserved = []  # no byte fallback: literal escaping impossible, behave like plain SentencePiece
    self._literal_re = re.compile('[' + ''.join(reserved) + ']') if reserved else None
    self._literal_ids = {
        c: [sp.piece_to_id(f'<0x{b:02X}>') for b in c.encode('utf-8')] for c in reserved}
    self._literal_by_ids = {tuple(ids): c for c, ids in self._literal_ids.items()}
    self._literal_first = {ids[0] for ids in self._literal_ids.values()}
    if self._ws:
      self._line_re = re.compile('\n( {0,%d})' % self._max_indent)
      self._line_table = {'\n' + ' ' * k: _line_symbol(k) for k in range(self._max_indent + 1)}
      self._unline = {_LINE_BASE + k: '\n' + ' ' * k for k in range(self._max_indent + 1)}

  def _to_model_text(self, text: str) -> str:
    """Maps newline+indent runs to their symbols (text must hold no reserved characters)."""
    if not self._ws:
      return text
    return self._line_re.sub(lambda m: self._line_table[m.group()], text)

  def _from_model_text(self, text: str) -> str:
    return text.translate(self._unline) if self._ws else text

  # -- public API -------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def doc_start_id(self) -> int:
    """The token a document follows in training data: palmax packs documents each followed by
    EOS (train/data.py `pack`), so a prompt starts after an EOS."""
    return self.eos_id

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @functools.cached_property
  def digest(self) -> str:
    """sha256 hex of the serialized model: identifies the tokenizer in cache keys."""
    return hashlib.sha256(self._proto).hexdigest()

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes many texts at once; SentencePiece runs them on `num_threads` (0 = all cores)."""
    num_threads = num_threads or os.cpu_count() or 1
    for t in texts:
      if not isinstance(t, str):
        raise ValueError(f'Tokenizer.encode expects str, got {type(t).__name__}')
    plain_idx = [i for i, t in enumerate(texts)
                 if self._literal_re is None or not self._literal_re.search(t)]
    out: list[list[int]] = [[] for _ in texts]
    plain = self._sp.encode([self._to_model_text(texts[i]) for i in plain_idx],
                            num_threads=num_threads) if plain_idx else []
    for i, ids in zip(plain_idx, plain):
      out[i] = ids
    for i in set(range(len(texts))) - set(plain_idx):
      out[i] = self._encode_with_literals(texts[i])
    return out

  def _encode_with_literals(self, text: str) -> list[int]:
    ids: list[int] = []
    pos = 0
    for m in self._literal_re.finditer(text):
      if m.start() > pos:
        ids += self._sp.encode(self._to_model_text(text[pos:m.start()]))
      ids += self._literal_ids[m.group()]
      pos = m.end()
    if pos < len(text):
      ids += self._sp.encode(self._to_model_text(text[pos:]))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of `encode`; pad/eos/bos/control ids decode to nothing."""
    ids = [int(i) for i in ids]
    if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
      bad = next(i for i in ids if not 0 <= i < self.vocab_size)
      raise ValueError(f'token id {bad} is out of range [0, {self.vocab_size}) for {self.where}')
    parts, start, i = [], 0, 0
    while i < len(ids):
      literal = (self._literal_by_ids.get(tuple(ids[i:i + 3]))
                 if ids[i] in self._literal_first else None)
      if literal is None:
        i += 1
        continue
      parts.append(self._from_model_text(self._sp.decode(ids[start:i])))
      parts.append(literal)
      i += 3
      start = i
    parts.append(self._from_model_text(self._sp.decode(ids[start:])))
    return ''.join(parts)

  def bytes_per_token(self, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over `texts` (higher = better compression)."""
    n_tokens = sum(len(ids) for ids in self.encode_batch(list(texts)))
    n_bytes = sum(len(t.encode('utf-8')) for t in texts)
    return n_bytes / max(n_tokens, 1)

  def save(self, path: str) -> None:
    """Writes the SentencePiece `.model` file (atomically)."""
    _atomic_write(path, self._proto)

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    """Loads a SentencePiece `.model` file; ValueError naming `path` if missing or invalid."""
    path = os.fspath(path)
    if not paths.isfile(path):
      raise ValueError(f'tokenizer model {path!r} does not exist')
    return cls(paths.read_bytes(path), where=path)


def _atomic_write(path: str, data: bytes) -> None:
  paths.write_bytes(path, data)  # readers never see a half-written file


# ------------------------------------------------------------------------------------------------
# Training.


def training_chunks(texts: Iterable[str]) -> Iterator[str]:
  """Model-space training sentences: ~_CHUNK_CHARS characters, cut just before a line start."""
  table = {'\n' + ' ' * k: _line_symbol(k) for k in range(MAX_INDENT + 1)}
  line_re = re.compile('\n( {0,%d})' % MAX_INDENT)
  reserved_re = re.compile('[%s%s-%s]' % (_SPACE_SYMBOL, _line_symbol(0), _line_symbol(MAX_INDENT)))
  for text in texts:
    text = reserved_re.sub(' ', text)  # literal reserved chars would pose as spaces/newlines
    text = line_re.sub(lambda m: table[m.group()], text)
    lines = re.split('(?=[%s-%s])' % (_line_symbol(0), _line_symbol(MAX_INDENT)), text)
    chunk = ''
    for line in lines:
      if chunk and len(chunk) + len(line) > _CHUNK_CHARS:
        yield chunk
        chunk = ''
      chunk += line
      while len(chunk) > _MAX_SENTENCE:  # a pathological single line
        yield chunk[:_MAX_SENTENCE]
        chunk = chunk[_MAX_SENTENCE:]
    if chunk:
      yield chunk


def trainer_options(vocab_size: int, model_type: str = 'bpe') -> dict[str, Any]:
  """SentencePiece trainer options of the palmax scheme (also part of the cache key)."""
  return dict(
      model_type=model_type, vocab_size=vocab_size, byte_fallback=True, hard_vocab_limit=False,
      normalization_rule_name='identity', add_dummy_prefix=False, remove_extra_whitespaces=False,
      split_by_whitespace=False, allow_whitespace_only_pieces=True, split_digits=True,
      max_sentencepiece_length=32, max_sentence_length=_MAX_SENTENCE, character_coverage=0.9995,
      required_chars=_SPACE_SYMBOL + ''.join(_line_symbol(k) for k in range(MAX_INDENT + 1)),
      control_symbols=[WS_MARKER], pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      pad_piece='<pad>', eos_piece='<eos>', bos_piece='<bos>', unk_piece='<unk>',
      input_sentence_size=0, shuffle_input_sentence=False)


def train_tokenizer(docs: Sequence[Any], vocab_size: int, model_type: str = 'bpe',
                    path: str | None = None) -> Tokenizer:
  """Trains the palmax SentencePiece model on `docs` (Documents or strings); saves to `path` if set.

  BPE (default) trains on 8 MB of code in ~5 s on 2 cores; unigram is ~10x slower.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f'data.tokenizer.model_type must be one of {list(MODEL_TYPES)}, '
                     f'got {model_type!r}')
  if not isinstance(vocab_size, int) or vocab_size < 300:
    raise ValueError(f'data.tokenizer.vocab_size must be an int >= 300 (256 byte pieces, specials '
                     f'and {MAX_INDENT + 2} whitespace symbols are reserved), got {vocab_size!r}')
  texts = [d if isinstance(d, str) else d.text for d in docs]
  if not any(texts):
    raise ValueError('train_tokenizer: no training text (all documents are empty)')
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_chunks(texts), model_writer=proto, minloglevel=2,
        num_threads=os.cpu_count() or 1, **trainer_options(vocab_size, model_type))
  except RuntimeError as e:
    raise ValueError(f'SentencePiece training failed (data.tokenizer.vocab_size={vocab_size}, '
                     f'model_type={model_type!r}): {e}') from None
  tok = Tokenizer(proto.getvalue(), where=path or '<trained>')
  if path:
    tok.save(path)
  return tok


# ------------------------------------------------------------------------------------------------
# Loading: palmax SentencePiece models, or a checkpoint's own tokenizer.

HF_TOKENIZER_DIR = 'hf_tokenizer'   # In a workdir: the HF tokenizer files (kind 'hf').


def load_tokenizer(path: str):
  """A SentencePiece `.model` palmax can use as is (its own, or any with pad=0 and eos/bos), else
  a checkpoint tokenizer (`train/hf_tokenizer.py`): a directory of HF tokenizer files
  (tokenizer.model and/or tokenizer.json), or a SentencePiece model with another id layout
  (e.g. Llama's)."""
  path = os.fspath(path)
  from train import hf_tokenizer
  if paths.isdir(path):
    return hf_tokenizer.HFTokenizer(path)
  if path.endswith('.json'):
    raise ValueError(f'data.tokenizer.path {path!r}: pass the directory holding tokenizer.json '
                     '(its tokenizer_config.json names the special tokens)')
  try:
    return Tokenizer.load(path)
  except ValueError as e:
    if not paths.isfile(path) or 'not a SentencePiece model' in str(e):
      raise
    return hf_tokenizer.HFTokenizer.from_model_file(path)


def load_workdir_tokenizer(workdir: str):
  """The tokenizer a workdir was trained (or converted) with: a checkpoint tokenizer in
  `WORKDIR/hf_tokenizer/` when `tokenizer.json` says kind 'hf', or when that directory is there
  and no `tokenizer.model` is (a user copied one in after converting a checkpoint saved without
  tokenizer files); otherwise `WORKDIR/tokenizer.model`."""
  meta = _read_json(paths.join(workdir, 'tokenizer.json'))
  hf_dir = paths.join(workdir, meta.get('dir', HF_TOKENIZER_DIR))
  if meta.get('kind') == 'hf' or (
      not meta and paths.isdir(hf_dir) and not paths.exists(paths.join(workdir, 'tokenizer.model'))):
    from train import hf_tokenizer
    return hf_tokenizer.HFTokenizer(hf_dir, fallback=meta.get('fallback_ids'))
  model_path = paths.join(workdir, 'tokenizer.model')
  if not paths.exists(model_path):
    raise FileNotFoundError(f'workdir {workdir} has no tokenizer: expected {model_path} or the '
                            f"checkpoint's tokenizer files (tokenizer.json or tokenizer.model) in {hf_dir}")
  return Tokenizer.load(model_path)


# ------------------------------------------------------------------------------------------------
# Config entry point with a workdir cache.


def sample_training_text(docs: Sequence[Any], train_bytes: int) -> list[str]:
  """The first `train_bytes` UTF-8 bytes of the docs taken in content-hash order (0 = all).

  Hash order is a deterministic pseudo-random sample that does not depend on how the source
  listed its files; the last document is cut at a line boundary when possible.
  """
  texts = sorted((d if isinstance(d, str) else d.text for d in docs),
                 key=lambda t: hashlib.sha256(t.encode('utf-8')).digest())
  if not train_bytes:
    return texts
  out, used = [], 0
  for text in texts:
    data = text.encode('utf-8')
    if used + len(data) <= train_bytes:
      out.append(text)
      used += len(data)
      continue
    head = data[:train_bytes - used].decode('utf-8', errors='ignore')  # drop a cut character
    head = head[:head.rfind('\n')] if '\n' in head else head
    if head:
      out.append(head)
    break
  return out


def get_tokenizer(data_cfg: Any, train_docs: Sequence[Any], workdir: str | None) -> Tokenizer:
  """`resolve_tokenizer`, then writes the workdir's tokenizer files if they changed."""
  tok, save = resolve_tokenizer(data_cfg, train_docs, workdir)
  if save is not None:
    save()
  return tok


def resolve_tokenizer(data_cfg: Any, train_docs: Sequence[Any],
                      workdir: str | None) -> tuple[Tokenizer, Callable[[], None] | None]:
  """The run's tokenizer and a `save()` that puts it in `workdir` (None when the workdir already
  holds it). Nothing is written here, so a caller can refuse a run after this without having
  touched the workdir (train/data.py writes only once every check has passed).

  The tokenizer is `data.tokenizer.path` if set (copied into the workdir, so a workdir always
  holds its tokenizer), else trained on the sampled training text. The workdir copy
  (`tokenizer.model` + `tokenizer.json`) is keyed by a hash of that text and the trainer options;
  a matching key reuses it.
  """
  tcfg = config_rules.field(data_cfg, 'tokenizer')
  if tcfg is None:
    raise ValueError('data.tokenizer is missing; expected vocab_size, model_type, path, train_bytes')
  vocab_size = int(config_rules.field(tcfg, 'vocab_size', 8192))
  path = config_rules.field(tcfg, 'path', '') or ''
  if path:
    tok = load_tokenizer(path)
    if tok.vocab_size > vocab_size:
      raise ValueError(f'data.tokenizer.path {path!r} has {tok.vocab_size} pieces, more than '
                       f'data.tokenizer.vocab_size={vocab_size}')
    kind = {} if isinstance(tok, Tokenizer) else {'kind': 'hf', 'dir': HF_TOKENIZER_DIR}
    meta = {'key': f'copied:{tok.digest}', 'source_path': paths.absolute(path),
            'vocab_size': tok.vocab_size, 'model_sha256': tok.digest, **kind}
    return tok, _saver(workdir, tok, meta)

  model_type = config_rules.field(tcfg, 'model_type', 'bpe') or 'bpe'
  train_bytes = int(config_rules.field(tcfg, 'train_bytes', 0) or 0)
  texts = sample_training_text(train_docs, train_bytes)
  h = hashlib.sha256(json.dumps(trainer_options(vocab_size, model_type), sort_keys=True).encode())
  for text in texts:
    data = text.encode('utf-8')
    h.update(len(data).to_bytes(8, 'little') + data)
  key = h.hexdigest()

  cached = _read_json(paths.join(workdir, 'tokenizer.json')) if workdir else {}
  if cached.get('key') == key:
    try:
      tok = Tokenizer.load(paths.join(workdir, 'tokenizer.model'))
      if tok.digest == cached.get('model_sha256'):
        return tok, None
    except ValueError:
      pass  # Missing, unreadable or replaced model file: train again.
  failpoints.reach('tokenizer.train')
  start = time.time()
  tok = train_tokenizer(texts, vocab_size, model_type, None)
  meta = {'key': key, 'vocab_size': tok.vocab_size, 'requested_vocab_size': vocab_size,
          'model_type': model_type, 'train_bytes': sum(len(t.encode('utf-8')) for t in texts),
          'train_seconds': round(time.time() - start, 2), 'model_sha256': tok.digest}
  return tok, _saver(workdir, tok, meta)


def _on_disk_digest(workdir: str, tok) -> str | None:
  """The digest of the tokenizer `workdir` holds in the form `tok` would be saved in."""
  try:
    if isinstance(tok, Tokenizer):
      return Tokenizer.load(paths.join(workdir, 'tokenizer.model')).digest
    from train import hf_tokenizer
    fallback = _read_json(paths.join(workdir, 'tokenizer.json')).get('fallback_ids')
    return hf_tokenizer.HFTokenizer(paths.join(workdir, HF_TOKENIZER_DIR), fallback=fallback).digest
  except (OSError, ValueError):
    return None


def _saver(workdir: str | None, tok, meta: dict) -> Callable[[], None] | None:
  """A function writing `tok` and its `tokenizer.json` into `workdir`; None if it is there."""
  if not workdir:
    return None
  meta_path = paths.join(workdir, 'tokenizer.json')
  if _read_json(meta_path) == meta and _on_disk_digest(workdir, tok) == tok.digest:
    return None   # Both the key file and the model it names are there (a replaced model is not).

  def save():
    # The key file goes first and comes back last: a kill in between leaves no key, so the next
    # run rebuilds instead of trusting a half-replaced tokenizer.
    paths.remove(meta_path)
    if isinstance(tok, Tokenizer):
      tok.save(paths.join(workdir, 'tokenizer.model'))
    else:  # A checkpoint's own tokenizer (train/hf_tokenizer.py): a directory of HF files.
      tok.save(paths.join(workdir, HF_TOKENIZER_DIR))
    failpoints.reach('tokenizer.write')
    _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
  return save


def _read_json(path: str) -> dict:
  out = paths.read_json(path, {})
  return out if isinstance(out, dict) else {}

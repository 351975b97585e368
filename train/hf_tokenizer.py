"""The tokenizer that came with a Hugging Face checkpoint, behind palmax's Tokenizer interface.

palmax's own `train.tokenizer.Tokenizer` maps newlines and indentation to private symbols and
expects pad=0/eos=1/bos=2; a checkpoint's tokenizer must encode exactly as the model was trained,
so it is used as is: a SentencePiece `tokenizer.model` (Llama 2, Mistral, Mixtral, Gemma; preferred
when present, SentencePiece is a core dependency) or a HF `tokenizer.json` (Llama 3; needs the
`tokenizers` package of the `hf` extra). Same interface as Tokenizer: vocab_size, pad/eos/bos/unk
ids, digest, encode, encode_batch, decode, id_to_piece, bytes_per_token, save.

Special ids come from `tokenizer_config.json` / `special_tokens_map.json` (token strings), else
the SentencePiece model, else `fallback` ids (the model's config.json); they are written to
`palmax_special_ids.json` when saved, so a saved directory loads the same way anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Iterable, Sequence

import sentencepiece as spm

from train import paths

TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'added_tokens.json')
IDS_FILE = 'palmax_special_ids.json'
_SPECIALS = ('bos', 'eos', 'pad', 'unk')


def has_tokenizer(directory: str) -> bool:
  return any(paths.isfile(paths.join(directory, f)) for f in ('tokenizer.model', 'tokenizer.json'))


def _token_string(v) -> str | None:
  if isinstance(v, dict):
    return v.get('content')
  return v if isinstance(v, str) else None


class HFTokenizer:
  """A checkpoint's SentencePiece model or HF tokenizer.json; see the module docstring."""

  def __init__(self, directory: str, fallback: dict[str, int] | None = None,
               files: dict[str, bytes] | None = None):
    """Loads the tokenizer files of `directory` (or the given `files`, named as in a directory)."""
    self.where = directory
    if files is None:
      if not paths.isdir(directory):
        raise ValueError(f'tokenizer directory {directory!r} does not exist')
      files = {}
      for f in TOKENIZER_FILES + (IDS_FILE,):
        if paths.isfile(paths.join(directory, f)):
          files[f] = paths.read_bytes(paths.join(directory, f))
    self._ids_file = files.pop(IDS_FILE, None)
    self._files = files
    if 'tokenizer.model' in self._files:
      self.kind = 'sentencepiece'
      self._sp = spm.SentencePieceProcessor()
      try:
        self._sp.LoadFromSerializedProto(self._files['tokenizer.model'])
      except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text.
        raise ValueError(f'{directory}/tokenizer.model: not a SentencePiece model ({e})') from None
      self._vocab = self._sp.get_piece_size()

      def piece_id(s):   # SentencePiece maps unknown pieces to unk.
        i = self._sp.piece_to_id(s)
        return None if i == self._sp.unk_id() and s != self._sp.id_to_piece(i) else i
      own = {'bos': self._sp.bos_id(), 'eos': self._sp.eos_id(), 'pad': self._sp.pad_id(),
             'unk': self._sp.unk_id()}
    elif 'tokenizer.json' in self._files:
      self.kind = 'tokenizer.json'
      try:
        import tokenizers
      except ImportError:
        raise ValueError(f'{directory}/tokenizer.json needs the `tokenizers` package: '
                         "pip install 'palmax[hf]'") from None
      self._tk = tokenizers.Tokenizer.from_str(self._files['tokenizer.json'].decode('utf-8'))
      self._vocab = self._tk.get_vocab_size(with_added_tokens=True)
      piece_id = self._tk.token_to_id
      own = {}
    else:
      raise ValueError(f'{directory} has no tokenizer.model or tokenizer.json')
    self.ids = self._resolve(piece_id, own, fallback or {})
    if self.ids.get('eos') is None:
      raise ValueError(f'{directory}: cannot tell the end-of-sequence token (set eos_token in '
                       'tokenizer_config.json)')

  def _resolve(self, piece_id, own: dict, fallback: dict) -> dict[str, int | None]:
    if self._ids_file is not None:
      return {k: json.loads(self._ids_file).get(k) for k in _SPECIALS}
    named: dict[str, str] = {}
    for file in ('special_tokens_map.json', 'tokenizer_config.json'):   # The latter wins.
      if file in self._files:
        cfg = json.loads(self._files[file])
        for k in _SPECIALS:
          s = _token_string(cfg.get(f'{k}_token'))
          if s is not None:
            named[k] = s
    ids: dict[str, int | None] = {}
    for k in _SPECIALS:
      v = piece_id(named[k]) if k in named else None
      if v is None and own.get(k, -1) >= 0:
        v = own[k]
      if v is None and fallback.get(k) is not None:
        v = int(fallback[k])
      ids[k] = v
    return ids

  @classmethod
  def from_model_file(cls, path: str) -> 'HFTokenizer':
    """A bare SentencePiece model file (special ids from the model itself)."""
    return cls(path, files={'tokenizer.model': paths.read_bytes(path)})

  # -- Tokenizer interface ----------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self._vocab

  @property
  def eos_id(self) -> int:
    return self.ids['eos']

  @property
  def bos_id(self) -> int:
    return self.ids['bos'] if self.ids.get('bos') is not None else self.ids['eos']

  @property
  def doc_start_id(self) -> int:
    """HF checkpoints (Llama, Mistral, Gemma) were trained with each document opening on BOS."""
    return self.bos_id

  @property
  def pad_id(self) -> int:
    """The tokenizer's pad token, else 0 (palmax pads with a fill value and masks by weight)."""
    return self.ids['pad'] if self.ids.get('pad') is not None else 0

  @property
  def unk_id(self) -> int:
    return self.ids['unk'] if self.ids.get('unk') is not None else -1

  @property
  def digest(self) -> str:
    h = hashlib.sha256(self.kind.encode())
    for name in sorted(self._files):
      h.update(name.encode() + b'\0' + hashlib.sha256(self._files[name]).digest())
    h.update(json.dumps(self.ids, sort_keys=True).encode())
    return h.hexdigest()

  def id_to_piece(self, token_id: int) -> str:
    if self.kind == 'sentencepiece':
      return self._sp.id_to_piece(int(token_id))
    return self._tk.id_to_token(int(token_id))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS added."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    for t in texts:
      if not isinstance(t, str):
        raise ValueError(f'Tokenizer.encode expects str, got {type(t).__name__}')
    if self.kind == 'sentencepiece':
      return self._sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)
    return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of `encode`; special tokens (bos/eos/pad) decode to nothing."""
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
    if bad is not None:
      raise ValueError(f'token id {bad} is out of range [0, {self.vocab_size}) for {self.where}')
    if self.kind == 'sentencepiece':
      return self._sp.decode(ids)
    return self._tk.decode(ids, skip_special_tokens=True)

  def bytes_per_token(self, texts: Sequence[str]) -> float:
    n_tokens = sum(len(ids) for ids in self.encode_batch(list(texts)))
    return sum(len(t.encode('utf-8')) for t in texts) / max(n_tokens, 1)

  def save(self, directory: str) -> None:
    """Writes the tokenizer files and the resolved special ids into `directory` (replaced)."""
    files = dict(self._files, **{IDS_FILE: json.dumps(self.ids, indent=1).encode()})
    if paths.is_remote(directory):   # No directory renames on an object store: file by file.
      for name, data in files.items():
        paths.write_bytes(paths.join(directory, name), data)
      return
    tmp = f'{directory}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, data in files.items():
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(data)
    if os.path.isdir(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)

  def hf_files(self) -> dict[str, bytes]:
    """The HF tokenizer files as they came (for export)."""
    return dict(self._files)

"""Tests for train/tokenizer.py: lossless round trip, whitespace scheme, ids, caching, errors."""
import argparse
import dataclasses
import inspect
import io
import json
import os
import random
import shlex
import textwrap

import pytest
import sentencepiece as spm

from train import tokenizer as tokenizer_lib
from train.corpus import Document
from train.tokenizer import Tokenizer

# Real Python code from a few stdlib modules (not the whole corpus): train vs held-out.
TRAIN_TEXTS = [inspect.getsource(m) for m in (argparse, dataclasses, textwrap)]
HELD_OUT = [inspect.getsource(shlex)]
VOCAB = 1000

TRICKY = [
    '', 'x', '\n', '\n\n\n', 'a\n', '\na', '  lead', 'trail  ', 'a  b   c    d',
    'def f(x):\n    if x:\n        return 1\n\n    return 2\n',
    '\tx\t\ty\n\t\tz', '  \n  \n', '\n' + ' ' * 45 + 'deep', ' \t \n\t ',
    'caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0645\u0631\u062d\u0628\u0627',
    'emoji \U0001F389\U0001F44D\U0001F3FD \u2764\ufe0f', '0123456789 3.14159 1e-10 0xFF',
    '\u2581 literal lower-one-eighth block \u2581\u2581', '\ue000\ue001\ue020 private use \ue021',
    '\n\u2581\n \ue000 \n', '<pad><eos><bos><unk><palmax-ws-v1>', '\x00\x01\x0b\x0c\x7f',
    '\u00a0\u2009\u3000 odd spaces', 'line\r\nwith cr',
]


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_tokenizer(TRAIN_TEXTS, VOCAB)


def test_special_ids(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.doc_start_id == tok.eos_id   # Documents are packed each followed by EOS.
  assert tok.vocab_size == VOCAB
  assert tok.decode([tok.bos_id, tok.pad_id] + tok.encode('hi') + [tok.eos_id]) == 'hi'
  with pytest.raises(ValueError, match='token id 1000 is out of range'):
    tok.decode([5, 1000])
  with pytest.raises(ValueError, match='expects str'):
    tok.encode(b'bytes')


@pytest.mark.parametrize('text', TRICKY)
def test_round_trip_tricky(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_round_trip_fuzz_and_batch(tok):
  rng = random.Random(0)
  alphabet = list(' \n\t\u2581\ue000\ue003ab1\u00e9\U0001F389_:(') + ['    ', '\n    ']
  texts = [''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
  batch = tok.encode_batch(texts)
  for text, ids in zip(texts, batch):
    assert ids == tok.encode(text)
    assert tok.decode(ids) == text
  for text in HELD_OUT + TRAIN_TEXTS:
    assert tok.decode(tok.encode(text)) == text


def test_newline_and_indent_are_single_symbols(tok):
  # '\n' + 8 spaces is one symbol, so a deeply indented line costs no extra tokens for indentation.
  ids = tok.encode('\n        ')
  assert len(ids) == 1 and tok.decode(ids) == '\n        '
  digits = tok.encode('12345')
  assert len(digits) == 5  # digits are split one per token, as in PaLM


def test_better_than_naive_sentencepiece_on_code(tok):
  naive_proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(l for t in TRAIN_TEXTS for l in t.split('\n') if l),
      model_writer=naive_proto, model_type='bpe', vocab_size=VOCAB, byte_fallback=True,
      hard_vocab_limit=False, normalization_rule_name='identity', add_dummy_prefix=False,
      remove_extra_whitespaces=False, minloglevel=2, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
  naive = Tokenizer(naive_proto.getvalue())
  ours, base = tok.bytes_per_token(HELD_OUT), naive.bytes_per_token(HELD_OUT)
  assert ours > 1.3 * base, (ours, base)  # measured: 2.85 vs 1.53 bytes/token
  assert ours > 2.5


def test_training_is_deterministic_and_unigram_works():
  small = TRAIN_TEXTS[2:]
  a = tokenizer_lib.train_tokenizer(small, 500)
  assert a.digest == tokenizer_lib.train_tokenizer(small, 500).digest
  uni = tokenizer_lib.train_tokenizer(small, 500, model_type='unigram')
  for text in TRICKY + HELD_OUT:
    assert uni.decode(uni.encode(text)) == text


def test_training_errors():
  with pytest.raises(ValueError, match='model_type'):
    tokenizer_lib.train_tokenizer(TRAIN_TEXTS, 1000, model_type='wordpiece')
  with pytest.raises(ValueError, match='vocab_size'):
    tokenizer_lib.train_tokenizer(TRAIN_TEXTS, 100)
  with pytest.raises(ValueError, match='no training text'):
    tokenizer_lib.train_tokenizer(['', ''], 1000)


def test_save_load_and_bad_files(tok, tmp_path):
  path = str(tmp_path / 'sub' / 'tok.model')
  tok.save(path)
  loaded = Tokenizer.load(path)
  assert loaded.digest == tok.digest and loaded.encode(TRICKY[9]) == tok.encode(TRICKY[9])
  with pytest.raises(ValueError, match=r'nope\.model.*does not exist'):
    Tokenizer.load(str(tmp_path / 'nope.model'))
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'this is not a protobuf')
  with pytest.raises(ValueError, match=r'garbage\.model: not a SentencePiece model'):
    Tokenizer.load(str(garbage))


def test_load_rejects_model_without_pad_zero(tmp_path):
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN_TEXTS[2].split('\n')),
                                 model_writer=proto, vocab_size=300, minloglevel=2,
                                 hard_vocab_limit=False)  # default layout: unk=0, no pad
  path = tmp_path / 'llama_like.model'
  path.write_bytes(proto.getvalue())
  with pytest.raises(ValueError, match=r'llama_like\.model: pad id is -1'):
    Tokenizer.load(str(path))


def test_sample_training_text_is_order_independent():
  docs = [Document(str(i), f'line {i}\n' * (i + 1)) for i in range(20)]
  sample = tokenizer_lib.sample_training_text(docs, 300)
  assert sample == tokenizer_lib.sample_training_text(docs[::-1], 300)
  assert 200 < sum(len(t) for t in sample) <= 300
  assert sum(len(t) for t in tokenizer_lib.sample_training_text(docs, 0)) == sum(
      len(d.text) for d in docs)


def _cfg(**tok_fields):
  fields = dict(vocab_size=600, model_type='bpe', path='', train_bytes=0)
  fields.update(tok_fields)
  return {'tokenizer': fields}


def test_get_tokenizer_caches_in_workdir(tmp_path, monkeypatch):
  calls = []
  real = tokenizer_lib.train_tokenizer
  monkeypatch.setattr(tokenizer_lib, 'train_tokenizer',
                      lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
  docs = [Document('t', TRAIN_TEXTS[2])]
  workdir = str(tmp_path)
  first = tokenizer_lib.get_tokenizer(_cfg(), docs, workdir)
  assert os.path.isfile(tmp_path / 'tokenizer.model') and len(calls) == 1
  second = tokenizer_lib.get_tokenizer(_cfg(), docs, workdir)
  assert len(calls) == 1 and second.digest == first.digest  # reused
  third = tokenizer_lib.get_tokenizer(_cfg(vocab_size=700), docs, workdir)
  assert len(calls) == 2 and third.vocab_size == 700  # settings changed: retrained
  tokenizer_lib.get_tokenizer(_cfg(vocab_size=700), docs + [Document('u', 'new text')], workdir)
  assert len(calls) == 3  # corpus changed: retrained
  assert json.load(open(tmp_path / 'tokenizer.json'))['requested_vocab_size'] == 700


def test_get_tokenizer_from_path(tok, tmp_path):
  path = str(tmp_path / 'given.model')
  tok.save(path)
  workdir = tmp_path / 'work'
  got = tokenizer_lib.get_tokenizer(_cfg(path=path, vocab_size=VOCAB), [], str(workdir))
  assert got.digest == tok.digest == Tokenizer.load(str(workdir / 'tokenizer.model')).digest
  with pytest.raises(ValueError, match=r'given\.model.*1000 pieces.*vocab_size=512'):
    tokenizer_lib.get_tokenizer(_cfg(path=path, vocab_size=512), [], None)
  with pytest.raises(ValueError, match=r'missing\.model'):
    tokenizer_lib.get_tokenizer(_cfg(path=str(tmp_path / 'missing.model')), [], None)
